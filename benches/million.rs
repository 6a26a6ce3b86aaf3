//! One million registrations, on a single `valkey-server` and on a local 6-node Valkey Cluster
//! (3 masters, 3 replicas): what the README's sizing table is derived from.
//!
//! ```sh
//! cargo bench --bench million                     # 1,000,000 on both targets (~30 min)
//! MILLION_N=100000 MILLION_TARGETS=single cargo bench --bench million
//! cargo bench --bench million -- --test           # smoke: 2,000 per target, 1 s phases
//! ```
//!
//! Knobs: `MILLION_N` (registrations, default 1,000,000), `MILLION_TARGETS` (`single`,
//! `cluster` or both, comma-separated; default both), `MILLION_SECS` (length of each ping
//! and baseline phase, default 10), `MILLION_CONNS` (HTTP and RESP connections, default 64).
//!
//! Per target: the orchestrator runs as a child process (this binary re-run with
//! `--serve-orchestrator`, TTL 3600 s so nothing expires), N registrations go through it over
//! HTTP; then, at N live registrations: Valkey memory per registration (`used_memory` delta,
//! summed over the masters; the replicas' reported apart), list one display name (100 and
//! 10,000 entries) and list all (streamed: time to the first body byte and to the end), pings
//! through the orchestrator, and the same ping script straight to Valkey (routed by slot on the
//! cluster) in the same run, a `SET` of a record-sized value straight to Valkey as the
//! baseline of a register, and a sweep pass (`Store::sweep`, the orchestrator stopped) with
//! nothing due and with every index entry due. CPU seconds are read from /proc (the
//! orchestrator) and `INFO cpu` (each Valkey node) around each phase: rates per CPU second are
//! the per-core figures, which hold on a machine whose cores are shared.

#[allow(dead_code)]
#[path = "../orchestrator/tests/support/cluster.rs"]
mod cluster;
#[allow(dead_code)]
mod common;
#[allow(dead_code)]
#[path = "../orchestrator/tests/support/valkey.rs"]
mod valkey;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use servicekit_orchestrator::store::{Store, ValkeyStore};
use ulid::Ulid;

use common::{
    connect, cores, cpu_time, env_num, info_number, ping_phase, used_memory, Reply, Resp,
};

const PREFIX: &str = "servicekit:";
const TTL: Duration = Duration::from_secs(3600);
/// Display names: 100 entries, 10,000 entries, and the rest spread over [`SPREAD`] names.
const SMALL: (&str, usize) = ("small-100", 100);
const BIG: (&str, usize) = ("big-10k", 10_000);
const SPREAD: usize = 1_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--serve-orchestrator") {
        return common::serve_orchestrator();
    }
    let quick = common::quick(&args);
    let n = if quick {
        2_000
    } else {
        env_num("MILLION_N", 1_000_000)
    };
    let secs = if quick {
        1
    } else {
        env_num("MILLION_SECS", 10)
    } as u64;
    let conns = env_num("MILLION_CONNS", 64);
    let targets = std::env::var("MILLION_TARGETS").unwrap_or_else(|_| "single,cluster".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("machine: {} cores, load average {}", cores(), loadavg());
    for name in targets.split(',') {
        let target = Target::start(name);
        rt.block_on(run(&target, n, Duration::from_secs(secs), conns));
    }
}

/// A Valkey deployment: where its masters and replicas listen.
struct Target {
    name: String,
    url: String,
    masters: Vec<u16>,
    replicas: Vec<u16>,
    routing: Routing,
    _single: Option<valkey::ValkeyServer>,
    _cluster: Option<cluster::ValkeyCluster>,
}

impl Target {
    fn start(name: &str) -> Target {
        match name {
            "single" => {
                let server = valkey::ValkeyServer::new();
                Target {
                    name: name.into(),
                    url: server.url(),
                    masters: vec![server.port()],
                    replicas: vec![],
                    routing: Routing {
                        masters: vec![server.port()],
                        slots: vec![],
                    },
                    _single: Some(server),
                    _cluster: None,
                }
            }
            "cluster" => {
                let cluster = cluster::ValkeyCluster::new();
                let topology = cluster.topology();
                let slots: Vec<(u16, u16, u16)> = topology
                    .iter()
                    .filter(|n| n.master)
                    .flat_map(|n| n.slots.iter().map(|&(a, b)| (a, b, n.port)))
                    .collect();
                let masters: Vec<u16> = topology
                    .iter()
                    .filter(|n| n.master)
                    .map(|n| n.port)
                    .collect();
                Target {
                    name: name.into(),
                    url: cluster.url(),
                    masters: masters.clone(),
                    replicas: topology
                        .iter()
                        .filter(|n| !n.master)
                        .map(|n| n.port)
                        .collect(),
                    routing: Routing { masters, slots },
                    _single: None,
                    _cluster: Some(cluster),
                }
            }
            other => panic!("MILLION_TARGETS: unknown target {other:?} (single, cluster)"),
        }
    }

    /// `INFO` numbers summed over `ports`.
    async fn sum(ports: &[u16], section: &str, fields: &[&str]) -> f64 {
        let mut total = 0.0;
        for &port in ports {
            let mut conn = Resp::connect(port).await;
            for f in fields {
                total += info_number(&mut conn, section, f).await;
            }
        }
        total
    }

    async fn cpu(ports: &[u16]) -> f64 {
        Target::sum(ports, "cpu", &["used_cpu_user", "used_cpu_sys"]).await
    }

    async fn memory(ports: &[u16]) -> Vec<u64> {
        let mut out = Vec::new();
        for &port in ports {
            out.push(used_memory(&mut Resp::connect(port).await).await);
        }
        out
    }
}

/// Which master serves a key: the slot map of a cluster (empty for a single server).
#[derive(Clone)]
struct Routing {
    masters: Vec<u16>,
    /// Slot ranges and their master's port.
    slots: Vec<(u16, u16, u16)>,
}

impl Routing {
    /// The port of the master that serves `key`.
    fn port_of(&self, key: &str) -> u16 {
        if self.slots.is_empty() {
            return self.masters[0];
        }
        let slot = key_slot(key);
        self.slots
            .iter()
            .find(|&&(a, b, _)| (a..=b).contains(&slot))
            .map(|&(_, _, port)| port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }
}

/// RESP connections to every master, one command routed by its first key.
struct Routed {
    routing: Routing,
    conns: HashMap<u16, Resp>,
}

impl Routed {
    async fn new(routing: &Routing) -> Routed {
        let mut conns = HashMap::new();
        for &port in &routing.masters {
            conns.insert(port, Resp::connect(port).await);
        }
        Routed {
            routing: routing.clone(),
            conns,
        }
    }

    async fn call(&mut self, key: &str, args: &[&[u8]]) -> Reply {
        let port = self.routing.port_of(key);
        self.conns
            .get_mut(&port)
            .expect("a connection to every master")
            .call(args)
            .await
    }
}

/// Valkey Cluster's hash slot of `key`: CRC16 (XMODEM) of its hash tag, or of all of it.
fn key_slot(key: &str) -> u16 {
    let k = key.as_bytes();
    let tagged = k.iter().position(|&c| c == b'{').and_then(|open| {
        let rest = &k[open + 1..];
        rest.iter()
            .position(|&c| c == b'}')
            .filter(|&len| len > 0)
            .map(|len| &rest[..len])
    });
    let mut crc: u16 = 0;
    for &b in tagged.unwrap_or(k) {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % cluster::SLOTS
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn display_name(i: usize) -> String {
    if i < SMALL.1 {
        SMALL.0.to_owned()
    } else if i < SMALL.1 + BIG.1 {
        BIG.0.to_owned()
    } else {
        format!("service-{:04}", i % SPREAD)
    }
}

/// A typical registration: ~200 bytes of info, as in the load bench.
fn registration(i: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "url": format!("http://10.{}.{}.{}:8000", i / 65536 % 256, i / 256 % 256, i % 256),
        "info": {
            "display_name": display_name(i),
            "version": "1.4.2",
            "description": "Example workload used by the servicekit million benchmark",
            "team": "platform",
            "deployment_env": "production",
            "capabilities": ["http", "grpc"],
            "priority": 5
        }
    }))
    .expect("json")
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
}

async fn run(target: &Target, n: usize, phase: Duration, conns: usize) {
    let t = target.name.as_str();
    println!(
        "[{t}] {} master(s) {:?}, replicas {:?}; load average {}",
        target.masters.len(),
        target.masters,
        target.replicas,
        loadavg()
    );
    let (mut orch, addr) = common::spawn_orchestrator(&[
        ("VALKEY_URL", target.url.clone()),
        ("ORCHESTRATOR_TTL_SECONDS", TTL.as_secs().to_string()),
        ("ORCHESTRATOR_MAX_REGISTRATIONS", (n + 1000).to_string()),
    ]);
    let pid = orch.id();
    let mem_before = Target::memory(&target.masters).await;
    let replica_mem_before = Target::memory(&target.replicas).await;

    // Register N through the orchestrator.
    let (orch_cpu, valkey_cpu) = (
        cpu_time(&pid.to_string()).as_secs_f64(),
        Target::cpu(&target.masters).await,
    );
    let started = Instant::now();
    let ids = register_all(&addr, n, conns, t).await;
    let took = started.elapsed().as_secs_f64();
    let (orch_cpu, valkey_cpu) = (
        cpu_time(&pid.to_string()).as_secs_f64() - orch_cpu,
        Target::cpu(&target.masters).await - valkey_cpu,
    );
    let register_rate = n as f64 / took;
    println!(
        "[{t}] registered {n} in {took:.1} s: {register_rate:.0}/s over {conns} connections; orchestrator CPU {orch_cpu:.1} s ({:.0} registrations per orchestrator CPU second), Valkey masters CPU {valkey_cpu:.1} s ({:.0} per Valkey CPU second); load average {}",
        n as f64 / orch_cpu,
        n as f64 / valkey_cpu,
        loadavg()
    );

    // Memory at N.
    let mem_after = Target::memory(&target.masters).await;
    let replica_mem_after = Target::memory(&target.replicas).await;
    let grown: Vec<u64> = mem_after
        .iter()
        .zip(&mem_before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let total: u64 = grown.iter().sum();
    let replicas: u64 = replica_mem_after
        .iter()
        .zip(&replica_mem_before)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    println!(
        "[{t}] valkey memory: +{:.1} MB on the masters ({} per master), {:.0} bytes per registration; replicas +{:.1} MB ({:.0} bytes per registration)",
        total as f64 / 1e6,
        grown
            .iter()
            .map(|g| format!("{:.1} MB", *g as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", "),
        total as f64 / n as f64,
        replicas as f64 / 1e6,
        replicas as f64 / n as f64
    );

    // A store client of the bench's own: the record key here, the raw ping baseline and the
    // sweep passes below.
    let store = ValkeyStore::connect(&target.url, PREFIX, TTL)
        .await
        .expect("store");
    // The register baseline: SET of a record-sized value straight to Valkey.
    let record_key = store.ping_command(ids[0]).1[0].clone();
    let record_len = match Routed::new(&target.routing)
        .await
        .call(&record_key, &[b"STRLEN", record_key.as_bytes()])
        .await
    {
        Reply::Int(len) => len as usize,
        other => panic!("STRLEN: {other:?}"),
    };
    let set_rate = set_rate(target, record_len, phase, conns).await;
    println!(
        "[{t}] valkey alone, SET of a {record_len}-byte value with PX: {set_rate:.0}/s over {conns} connections; register/SET = {:.3} (a register is 5 round trips: count, URL lookup, index hints, record script, index settle)",
        register_rate / set_rate
    );

    list_timings(&addr, n, t).await;

    // Pings through the orchestrator, then the same script straight to Valkey.
    let ids = Arc::new(ids);
    let before = (
        cpu_time(&pid.to_string()).as_secs_f64(),
        Target::cpu(&target.masters).await,
        Target::cpu(&target.replicas).await,
    );
    let (pings, errors, mut lat) = ping_phase(&addr, ids.clone(), phase, conns).await;
    let used = (
        cpu_time(&pid.to_string()).as_secs_f64() - before.0,
        Target::cpu(&target.masters).await - before.1,
        Target::cpu(&target.replicas).await - before.2,
    );
    lat.sort_unstable();
    let rate = pings as f64 / phase.as_secs_f64();
    println!(
        "[{t}] orchestrator pings at {n}: {rate:.0}/s over {conns} connections for {phase:?}; errors {errors}; p50 {} µs, p99 {} µs, p99.9 {} µs; orchestrator CPU {:.2} s → {:.0} pings per orchestrator CPU second; Valkey masters CPU {:.2} s → {:.0} pings per master CPU second; replicas CPU {:.2} s",
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 0.999),
        used.0,
        pings as f64 / used.0,
        used.1,
        pings as f64 / used.1,
        used.2
    );
    let valkey_before = Target::cpu(&target.masters).await;
    let raw = raw_ping_count(target, &store, ids.clone(), phase, conns).await;
    let raw_cpu = Target::cpu(&target.masters).await - valkey_before;
    let raw_rate = raw as f64 / phase.as_secs_f64();
    println!(
        "[{t}] valkey alone, same ping script: {raw_rate:.0}/s over {conns} connections to each master; Valkey masters CPU {raw_cpu:.2} s → {:.0} per master CPU second; orchestrator/valkey = {:.2}; load average {}",
        raw as f64 / raw_cpu,
        rate / raw_rate,
        loadavg()
    );

    // Sweep passes with the orchestrator stopped, so its own sweeper and reaper stay out.
    drop(orch.stdin.take());
    let _ = orch.wait();
    sweep_passes(target, &store, n).await;
}

/// Registers `0..n` over `conns` connections; prints progress every tenth.
async fn register_all(addr: &str, n: usize, conns: usize, t: &str) -> Vec<Ulid> {
    let done = Arc::new(AtomicUsize::new(0));
    let progress = {
        let (done, t) = (done.clone(), t.to_owned());
        tokio::spawn(async move {
            let step = (n / 10).max(1);
            let (mut mark, mut last) = (step, Instant::now());
            while mark <= n {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if done.load(Ordering::Relaxed) >= mark {
                    println!(
                        "[{t}]   {mark} registered; last {step} at {:.0}/s",
                        step as f64 / last.elapsed().as_secs_f64()
                    );
                    mark += step;
                    last = Instant::now();
                }
            }
        })
    };
    let ids = common::register_range(addr, 0..n, conns, registration, &done).await;
    progress.abort();
    ids
}

/// `SET` of a `len`-byte value with `PX` to 10,000 keys, as many as `conns` connections do in
/// `phase`; per second.
async fn set_rate(target: &Target, len: usize, phase: Duration, conns: usize) -> f64 {
    let deadline = Instant::now() + phase;
    let value = Arc::new(vec![b'x'; len]);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let value = value.clone();
        let routing = target.routing.clone();
        tasks.push(tokio::spawn(async move {
            let mut routed = Routed::new(&routing).await;
            let (mut done, mut i) = (0usize, c * 7919);
            while Instant::now() < deadline {
                i = i.wrapping_add(104_729);
                let key = format!("bench:raw:{}", i % 10_000);
                match routed
                    .call(&key, &[b"SET", key.as_bytes(), &value, b"PX", b"3600000"])
                    .await
                {
                    Reply::Simple(_) => done += 1,
                    other => panic!("SET: {other:?}"),
                }
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    total as f64 / phase.as_secs_f64()
}

/// Time to the answer's head, its first body byte and its end, and the body (the last 64
/// bytes only unless `keep`).
struct Timed {
    head: Duration,
    first: Duration,
    end: Duration,
    bytes: usize,
    body: Vec<u8>,
}

async fn timed_get(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    path: &str,
    keep: bool,
) -> Timed {
    let req = http::Request::builder()
        .uri(path)
        .header("host", "bench")
        .body(Full::new(Bytes::new()))
        .expect("request");
    sender.ready().await.expect("connection ready");
    let started = Instant::now();
    let res = sender.send_request(req).await.expect("answer");
    let head = started.elapsed();
    assert_eq!(res.status(), 200, "GET {path}");
    let mut body = res.into_body();
    let (mut first, mut bytes, mut kept) = (None, 0, Vec::new());
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body").into_data() {
            if data.is_empty() {
                continue;
            }
            first.get_or_insert_with(|| started.elapsed());
            bytes += data.len();
            kept.extend_from_slice(&data);
            if !keep && kept.len() > 4096 {
                kept.drain(..kept.len() - 64);
            }
        }
    }
    let end = started.elapsed();
    Timed {
        head,
        first: first.unwrap_or(end),
        end,
        bytes,
        body: kept,
    }
}

/// The `count` at the end of a streamed list.
fn tail_count(tail: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(tail);
    let at = text.rfind("\"count\":")?;
    text[at + 8..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

async fn list_timings(addr: &str, n: usize, t: &str) {
    let mut sender = connect(addr).await;
    let spread = n.saturating_sub(SMALL.1 + BIG.1) / SPREAD;
    let by_name = [
        (SMALL.0, SMALL.1.min(n)),
        (BIG.0, BIG.1.min(n.saturating_sub(SMALL.1))),
        ("service-0042", spread),
    ];
    for (name, expect) in by_name {
        let path = format!("/services?display_name={name}");
        let mut best: Option<Timed> = None;
        for _ in 0..5 {
            let got = timed_get(&mut sender, &path, true).await;
            let v: Value = serde_json::from_slice(&got.body).expect("json");
            assert_eq!(v["count"].as_u64(), Some(expect as u64), "{path}");
            if best.as_ref().is_none_or(|b| got.end < b.end) {
                best = Some(got);
            }
        }
        let best = best.expect("five runs");
        println!(
            "[{t}] list display_name={name} ({expect} entries, {:.2} MB) at {n}: first byte {:.1} ms, end {:.1} ms (best of 5)",
            best.bytes as f64 / 1e6,
            best.first.as_secs_f64() * 1e3,
            best.end.as_secs_f64() * 1e3
        );
    }
    for run in 1..=2 {
        let got = timed_get(&mut sender, "/services", false).await;
        assert_eq!(tail_count(&got.body), Some(n as u64), "list all");
        println!(
            "[{t}] list all {n} (run {run}, {:.1} MB streamed): head {:.1} ms, first byte {:.1} ms, end {:.2} s ({:.0} entries/s)",
            got.bytes as f64 / 1e6,
            got.head.as_secs_f64() * 1e3,
            got.first.as_secs_f64() * 1e3,
            got.end.as_secs_f64(),
            n as f64 / got.end.as_secs_f64()
        );
    }
}

/// The ping script (`ValkeyStore::ping_command`) by `EVALSHA` over `conns` connections to
/// every master, each command sent to the master of its key; how many answered in `duration`.
async fn raw_ping_count(
    target: &Target,
    store: &ValkeyStore,
    ids: Arc<Vec<Ulid>>,
    duration: Duration,
    conns: usize,
) -> usize {
    let (lua, _, _) = store.ping_command(ids[0]);
    let mut sha = String::new();
    for &port in &target.masters {
        match Resp::connect(port)
            .await
            .call(&[b"SCRIPT", b"LOAD", lua.as_bytes()])
            .await
        {
            Reply::Bulk(s) => sha = String::from_utf8(s).expect("sha"),
            other => panic!("SCRIPT LOAD: {other:?}"),
        }
    }
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (ids, sha, store) = (ids.clone(), sha.clone(), store.clone());
        let routing = target.routing.clone();
        tasks.push(tokio::spawn(async move {
            let mut routed = Routed::new(&routing).await;
            let (mut done, mut i) = (0usize, c * 7919);
            while Instant::now() < deadline {
                i = i.wrapping_add(104_729);
                let (_, keys, args) = store.ping_command(ids[i % ids.len()]);
                let numkeys = keys.len().to_string();
                let mut cmd: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes(), numkeys.as_bytes()];
                cmd.extend(keys.iter().map(|k| k.as_bytes()));
                cmd.extend(args.iter().map(|a| a.as_bytes()));
                match routed.call(&keys[0], &cmd).await {
                    Reply::Array(_) => done += 1,
                    other => panic!("ping script: {other:?}"),
                }
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    total
}

/// Every score of the sorted set `key` set to 1 (long past), 10,000 members per script call
/// so Valkey is never blocked for long: the sweep then has to look at each entry.
const ALL_DUE: &str =
    "local m = redis.call('ZRANGEBYSCORE', KEYS[1], '(1', '+inf', 'LIMIT', 0, 10000)
for i = 1, #m do redis.call('ZADD', KEYS[1], 1, m[i]) end
return #m";

async fn sweep_passes(target: &Target, store: &ValkeyStore, n: usize) {
    let t = target.name.as_str();
    let me = std::process::id();
    let pass = |what: &'static str| async move {
        let (own, valkey) = (
            cpu_time(&me.to_string()).as_secs_f64(),
            Target::cpu(&target.masters).await,
        );
        let started = Instant::now();
        let dropped = store.sweep().await.expect("sweep");
        let took = started.elapsed();
        let (own, valkey) = (
            cpu_time(&me.to_string()).as_secs_f64() - own,
            Target::cpu(&target.masters).await - valkey,
        );
        assert_eq!(dropped, 0, "every entry is live");
        println!(
            "[{t}] sweep at {n}, {what}: {:.3} s; sweeping process CPU {own:.2} s, Valkey masters CPU {valkey:.2} s",
            took.as_secs_f64()
        );
    };
    pass("nothing due").await;

    let mut routed = Routed::new(&target.routing).await;
    let names_key = format!("{PREFIX}{{all}}:names");
    let names = match routed
        .call(&names_key, &[b"SMEMBERS", names_key.as_bytes()])
        .await
    {
        Reply::Array(items) => items
            .into_iter()
            .filter_map(|r| match r {
                Reply::Bulk(b) => String::from_utf8(b).ok(),
                _ => None,
            })
            .collect::<Vec<_>>(),
        other => panic!("SMEMBERS: {other:?}"),
    };
    let mut keys = vec![format!("{PREFIX}{{all}}:idx")];
    keys.extend(names.iter().map(|name| format!("{PREFIX}{{n:{name}}}:idx")));
    for key in &keys {
        loop {
            match routed
                .call(key, &[b"EVAL", ALL_DUE.as_bytes(), b"1", key.as_bytes()])
                .await
            {
                Reply::Int(0) => break,
                Reply::Int(_) => {}
                other => panic!("rewriting scores of {key}: {other:?}"),
            }
        }
    }
    pass("every index entry due (all live: read and rescored)").await;
    pass("nothing due again").await;
}
