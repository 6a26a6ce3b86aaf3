//! A real local Valkey Cluster for tests: six `valkey-server` processes (three masters, three
//! replicas) joined by `valkey-cli --cluster create`, each on a loopback port whose cluster bus
//! port (port + 10000) was free too.
//!
//! Nodes are killed with `SIGKILL` ([`ValkeyCluster::kill`]) and started again on the same port
//! with their `nodes.conf` ([`ValkeyCluster::restart`]), so they rejoin as replicas of whoever
//! took over. `--cluster-node-timeout 2000` makes a failover take about three seconds.
//! Missing `valkey-server` or `valkey-cli` binaries fail the test, never skip it. Everything
//! is killed and removed when the cluster is dropped, also when the test panics.
//!
//! [`shared`] is one cluster for every test of a test binary that does not kill nodes (each
//! test keeps to its own key prefix). A static is never dropped, so a reaper process kills
//! and removes its nodes once the test binary is gone, however it ended.

use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::valkey::{free_port, ValkeyServer};

/// Milliseconds a node may be unreachable before the cluster fails it over.
pub const NODE_TIMEOUT_MS: u64 = 2_000;
/// How long cluster creation and a failover may take before the test fails.
const CLUSTER_DEADLINE: Duration = Duration::from_secs(60);
/// The cluster bus listens at the data port plus this.
const BUS_OFFSET: u16 = 10_000;
/// Hash slots in a Valkey Cluster.
pub const SLOTS: u16 = 16_384;

/// One node as `CLUSTER NODES` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// `fail` or `fail?` in its flags.
    pub failing: bool,
    /// The master's node id, for a replica.
    pub master_id: Option<String>,
    /// Slot ranges served, for a master (`(first, last)`, inclusive).
    pub slots: Vec<(u16, u16)>,
}

/// Six nodes: three masters and three replicas.
#[derive(Debug)]
pub struct ValkeyCluster {
    nodes: Vec<ValkeyServer>,
}

impl ValkeyCluster {
    /// Starts six nodes, creates the cluster and waits until every node reports
    /// `cluster_state:ok` and knows all six.
    pub fn new() -> ValkeyCluster {
        let nodes: Vec<ValkeyServer> = (0..6)
            .map(|_| {
                ValkeyServer::with(
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        &NODE_TIMEOUT_MS.to_string(),
                        // A replica of a killed master takes over however long ago it last
                        // heard from it.
                        "--cluster-replica-validity-factor",
                        "0",
                        // A replica's first sync starts at once, not after Valkey's default
                        // 5 s wait for more replicas.
                        "--repl-diskless-sync-delay",
                        "0",
                    ]
                    .map(String::from)
                    .to_vec(),
                    port_with_free_bus,
                )
            })
            .collect();
        let cluster = ValkeyCluster { nodes };
        let mut args = vec!["--cluster".to_owned(), "create".to_owned()];
        args.extend(
            cluster
                .nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port())),
        );
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let out = cli(&args);
        assert!(
            out.contains("[OK] All 16384 slots covered"),
            "valkey-cli --cluster create failed:\n{out}"
        );
        cluster.wait_ok();
        cluster
    }

    /// `redis-cluster://127.0.0.1:PORT` with node `seed` as the only seed.
    pub fn url_seeded_by(&self, seed: usize) -> String {
        format!("redis-cluster://127.0.0.1:{}", self.nodes[seed].port())
    }

    /// A cluster URL with every node as a seed, in the comma-separated form.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis-cluster://{}", hosts.join(","))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn port(&self, node: usize) -> u16 {
        self.nodes[node].port()
    }

    /// The node index listening on `port`.
    pub fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port() == port)
    }

    pub fn is_running(&self, node: usize) -> bool {
        self.nodes[node].is_running()
    }

    /// `CLUSTER NODES` as seen by a running node.
    pub fn topology(&self) -> Vec<NodeInfo> {
        let node = self.any_running();
        parse_nodes(&self.cli_on(node, &["CLUSTER", "NODES"]))
    }

    /// Indices of the nodes that are masters now (not failing).
    pub fn masters(&self) -> Vec<usize> {
        self.topology()
            .iter()
            .filter(|n| n.master && !n.failing && !n.slots.is_empty())
            .filter_map(|n| self.index_of_port(n.port))
            .collect()
    }

    /// The index of the master serving `slot`.
    pub fn master_of_slot(&self, slot: u16) -> usize {
        self.topology()
            .iter()
            .find(|n| {
                n.master && !n.failing && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
            })
            .and_then(|n| self.index_of_port(n.port))
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// The index of the master serving `key` (`CLUSTER KEYSLOT`).
    pub fn master_of_key(&self, key: &str) -> usize {
        let node = self.any_running();
        let slot: u16 = self
            .cli_on(node, &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT {key}: {e}"));
        self.master_of_slot(slot)
    }

    /// The index of the replica of master `master`.
    pub fn replica_of(&self, master: usize) -> usize {
        let topology = self.topology();
        let master_id = topology
            .iter()
            .find(|n| self.index_of_port(n.port) == Some(master))
            .map(|n| n.id.clone())
            .unwrap_or_else(|| panic!("node {master} is not in the topology"));
        topology
            .iter()
            .find(|n| n.master_id.as_deref() == Some(master_id.as_str()) && !n.failing)
            .and_then(|n| self.index_of_port(n.port))
            .unwrap_or_else(|| panic!("node {master} has no replica"))
    }

    /// A field of `INFO replication` on node `node`.
    pub fn replication_field(&self, node: usize, name: &str) -> String {
        let info = self.cli_on(node, &["INFO", "replication"]);
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in INFO replication of node {node}:\n{info}"))
            .trim()
            .to_owned()
    }

    /// Lets master `master`'s replica catch up, then cuts it off its replication link (it now
    /// sends a `masterauth` its master refuses), so that every write from now on reaches the
    /// master only, and a failover certainly loses it. Returns the replica's index. The
    /// replica still takes over when the master dies (`cluster-replica-validity-factor 0`).
    pub fn cut_replication(&self, master: usize) -> usize {
        let replica = self.replica_of(master);
        let offset: u64 = self
            .replication_field(master, "master_repl_offset")
            .parse()
            .unwrap_or_else(|e| panic!("master_repl_offset of node {master}: {e}"));
        wait_until("the replica to catch up", || {
            self.replication_field(replica, "slave_repl_offset")
                .parse::<u64>()
                .is_ok_and(|o| o >= offset)
        });
        let set = self.cli_on(
            replica,
            &["CONFIG", "SET", "masterauth", "not-the-password"],
        );
        assert_eq!(set.trim(), "OK", "CONFIG SET masterauth on node {replica}");
        self.cli_on(replica, &["CLIENT", "KILL", "TYPE", "master"]);
        wait_until("the replica's link to go down", || {
            self.replication_field(replica, "master_link_status") == "down"
        });
        replica
    }

    /// Kills node `node` with SIGKILL (no goodbye to the cluster), as a crash would.
    pub fn kill(&mut self, node: usize) {
        self.nodes[node].stop();
    }

    /// Freezes node `node` (`SIGSTOP`): its connections stay open but nothing answers.
    pub fn pause(&mut self, node: usize) {
        self.nodes[node].pause();
    }

    /// Thaws a node frozen by [`ValkeyCluster::pause`] (`SIGCONT`).
    pub fn resume(&mut self, node: usize) {
        self.nodes[node].resume();
    }

    /// Starts a killed node again on its port; it rejoins with its `nodes.conf`.
    pub fn restart(&mut self, node: usize) {
        self.nodes[node].start();
    }

    /// Waits until every running node reports `cluster_state:ok`, all 16384 slots are served
    /// by masters that are not failing, every running node sees the same masters, and every
    /// replica has finished its sync.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + CLUSTER_DEADLINE;
        loop {
            let last = match self.check_ok() {
                Ok(()) => return,
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "the cluster did not settle within {CLUSTER_DEADLINE:?}: {last}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn check_ok(&self) -> Result<(), String> {
        let mut views = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.is_running() {
                continue;
            }
            let info = self.cli_on(i, &["CLUSTER", "INFO"]);
            if !info.contains("cluster_state:ok") {
                return Err(format!("node {i}: {}", first_line(&info)));
            }
            // A replica counts once its first sync is done: before that, a failover of its
            // master loses everything written so far.
            let replication = self.cli_on(i, &["INFO", "replication"]);
            if replication.contains("role:slave") && !replication.contains("master_link_status:up")
            {
                return Err(format!("node {i}: replica not in sync yet"));
            }
            let topology = parse_nodes(&self.cli_on(i, &["CLUSTER", "NODES"]));
            let running = self.nodes.iter().filter(|n| n.is_running()).count();
            let known_alive = topology.iter().filter(|n| !n.failing).count();
            if known_alive < running {
                return Err(format!(
                    "node {i} sees {known_alive} of {running} nodes alive"
                ));
            }
            let mut masters: Vec<(u16, Vec<(u16, u16)>)> = topology
                .iter()
                .filter(|n| n.master && !n.failing && !n.slots.is_empty())
                .map(|n| (n.port, n.slots.clone()))
                .collect();
            masters.sort();
            let covered: u32 = masters
                .iter()
                .flat_map(|(_, s)| s)
                .map(|&(a, b)| u32::from(b - a) + 1)
                .sum();
            if covered != u32::from(SLOTS) {
                return Err(format!("node {i} sees {covered} slots served"));
            }
            if let Some((p, _)) = masters.iter().find(|(p, _)| {
                self.index_of_port(*p)
                    .is_none_or(|m| !self.nodes[m].is_running())
            }) {
                return Err(format!(
                    "node {i} still sees the dead node on {p} as a master"
                ));
            }
            views.push(masters);
        }
        if views.windows(2).any(|w| w[0] != w[1]) {
            return Err("the nodes disagree about the masters".into());
        }
        Ok(())
    }

    /// Runs `valkey-cli -p PORT ARGS...` against node `node`; its output.
    pub fn cli_on(&self, node: usize, args: &[&str]) -> String {
        let mut all = vec![
            "-h".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            self.nodes[node].port().to_string(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        cli(&all)
    }

    /// Runs `valkey-cli --cluster SUBCOMMAND 127.0.0.1:PORT ARGS...` through node `node`
    /// (e.g. `rebalance`, `reshard`); its output.
    pub fn cluster_cli(&self, node: usize, subcommand: &str, args: &[&str]) -> String {
        let mut all = vec![
            "--cluster".to_owned(),
            subcommand.to_owned(),
            format!("127.0.0.1:{}", self.nodes[node].port()),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        cli(&all)
    }

    /// The node id of node `node` (`CLUSTER MYID`).
    pub fn id_of(&self, node: usize) -> String {
        self.cli_on(node, &["CLUSTER", "MYID"]).trim().to_owned()
    }

    /// Moves `slot` from master `from` to master `to` the way `valkey-cli --cluster reshard`
    /// does (IMPORTING, MIGRATING, `MIGRATE` in batches of `batch` keys, then `SETSLOT NODE`
    /// everywhere), pausing `pause` between batches so clients meet the slot half moved
    /// (ASK, TRYAGAIN). Returns the number of keys moved.
    pub fn migrate_slot(
        &self,
        slot: u16,
        from: usize,
        to: usize,
        batch: usize,
        pause: Duration,
    ) -> usize {
        let (from_id, to_id) = (self.id_of(from), self.id_of(to));
        let slot_text = slot.to_string();
        let ok = |node: usize, args: &[&str]| {
            let out = self.cli_on(node, args);
            assert!(
                out.trim() == "OK" || out.trim() == "NOKEY",
                "{args:?} on node {node}: {out}"
            );
        };
        ok(
            to,
            &["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &from_id],
        );
        ok(
            from,
            &["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &to_id],
        );
        let to_port = self.port(to).to_string();
        let batch_text = batch.to_string();
        let mut moved = 0;
        loop {
            let keys = self.cli_on(from, &["CLUSTER", "GETKEYSINSLOT", &slot_text, &batch_text]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(&keys);
            ok(from, &args);
            moved += keys.len();
            std::thread::sleep(pause);
        }
        ok(to, &["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id]);
        ok(from, &["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id]);
        for other in self.masters() {
            if other != from && other != to {
                ok(other, &["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id]);
            }
        }
        moved
    }

    fn any_running(&self) -> usize {
        self.nodes
            .iter()
            .position(ValkeyServer::is_running)
            .unwrap_or_else(|| panic!("no cluster node is running"))
    }
}

/// The test binary's shared cluster, started by the first caller. Blocks: call it through
/// `tokio::task::spawn_blocking` from async tests (see [`shared_async`]).
pub fn shared() -> &'static ValkeyCluster {
    static SHARED: OnceLock<(ValkeyCluster, Mutex<ChildStdin>)> = OnceLock::new();
    let (cluster, _reaper) = SHARED.get_or_init(|| {
        let cluster = ValkeyCluster::new();
        let reaper = cluster.reaper();
        (cluster, Mutex::new(reaper))
    });
    cluster
}

/// [`shared`] from an async test.
pub async fn shared_async() -> &'static ValkeyCluster {
    tokio::task::spawn_blocking(shared)
        .await
        .expect("start the shared cluster")
}

impl ValkeyCluster {
    /// Starts `sh` waiting for end of file on its stdin, then killing every node and removing
    /// its directory. Only this process holds the pipe's write end (std opens it close-on-exec),
    /// and the kernel closes it when the process ends, normally or not: the returned handle
    /// must live as long as the cluster should.
    // Never waited for: it must outlive this process, and init reaps it.
    #[allow(clippy::zombie_processes)]
    fn reaper(&self) -> ChildStdin {
        let pids: Vec<String> = self
            .nodes
            .iter()
            .filter_map(ValkeyServer::pid)
            .map(|p| p.to_string())
            .collect();
        let dirs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("'{}'", n.dir().display()))
            .collect();
        let script = format!(
            "read _ ; kill -9 {} 2>/dev/null ; sleep 0.2 ; rm -rf {}",
            pids.join(" "),
            dirs.join(" ")
        );
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the cluster's reaper: {e}"));
        child
            .stdin
            .take()
            .unwrap_or_else(|| panic!("the reaper has no stdin"))
    }
}

impl Default for ValkeyCluster {
    fn default() -> Self {
        ValkeyCluster::new()
    }
}

/// Polls `cond` every 50 ms until it holds; panics after [`CLUSTER_DEADLINE`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + CLUSTER_DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `valkey-cli` with `args`; stdout and stderr together. A missing binary or a failed
/// run fails the test.
fn cli(args: &[String]) -> String {
    let out = Command::new("valkey-cli").args(args).output();
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("valkey-cli not found: run .ci/install-deps ({e})")
        }
        Err(e) => panic!("cannot run valkey-cli {args:?}: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "valkey-cli {args:?} failed ({}):\n{text}",
        out.status
    );
    text
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// A free loopback port whose bus port (+10000) is free as well.
fn port_with_free_bus() -> u16 {
    for _ in 0..200 {
        let port = free_port();
        let Some(bus) = port.checked_add(BUS_OFFSET) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
    panic!("no loopback port with a free cluster bus port found")
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <state>
/// <slot>...`.
pub fn parse_nodes(text: &str) -> Vec<NodeInfo> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let flags: Vec<&str> = f[2].split(',').collect();
            let slots = f[8..]
                .iter()
                // Slots being imported or migrated are written in brackets.
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .collect();
            Some(NodeInfo {
                id: f[0].to_owned(),
                port,
                master: flags.contains(&"master"),
                failing: flags.iter().any(|f| f.starts_with("fail")),
                master_id: (f[3] != "-").then(|| f[3].to_owned()),
                slots,
            })
        })
        .collect()
}
