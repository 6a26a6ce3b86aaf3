//! Multi-host faults, with real processes on real (namespaced) networks.
//!
//! The test builds five "hosts" on this machine out of network namespaces (see
//! `multihost/netns.rs`): `valkey`, `orchestrator`, `svca` and `svcb`, plugged into a bridge in
//! a fifth, "switch" namespace from which the test itself queries the orchestrator. Each
//! process runs under its host's hostname and `/etc/hosts`, so the services advertise
//! `http://svca:8000` and `http://svcb:8000` from their auto-detected hostnames and reach
//! `http://orchestrator:9000` by name, as they would in a real deployment.
//!
//! Then, in order, on one topology (TTL 3 s, so a keepalive every second):
//!
//! 1. both services register with their hostnames;
//! 2. `kill -9` svca: its entry expires within the TTL, svcb is untouched;
//! 3. svcb's link goes down for longer than the TTL: it expires; back up, it registers again
//!    with the same id;
//! 4. Valkey restarts empty: svcb registers again, under a fresh id (the binding of its URL
//!    to the old one went with the data);
//! 5. the orchestrator restarts: svcb never disappears from a successful listing;
//! 6. SIGTERM svcb: its entry is gone while the process still runs.
//!
//! Needs root (namespaces), `ip` (iproute2), `unshare` (util-linux), `valkey-server`, and the
//! `orchestrator` binary and `service` example built (`scripts/test` builds them first). Each
//! scenario's time is printed on stderr (`-- --nocapture` shows it) and written to
//! `target/multihost-timings.txt`.

#[path = "multihost/netns.rs"]
mod netns;

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netns::{Host, Lab, ProcId, SIGKILL, SIGTERM};
use serde_json::Value;

const TTL_SECONDS: u64 = 3;
const TTL: Duration = Duration::from_secs(TTL_SECONDS);
const ORCH_PORT: u16 = 9000;
const SERVICE_PORT: u16 = 8000;
const POLL: Duration = Duration::from_millis(50);

/// The services' keepalive interval: the library's default, TTL / 3 (±10 %).
fn keepalive() -> Duration {
    TTL / 3
}

/// `target/<profile>` from this test binary's path (`target/<profile>/deps/<test>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("target directory")
}

fn built(path: PathBuf, how: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: build it first (`{how}`; scripts/test runs \
         `cargo build --workspace --bins --examples` before the tests)",
        path.display()
    );
    path
}

fn which(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("`{program}` is not on PATH; the multihost test needs it"))
}

/// One registration as the orchestrator lists it.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    id: String,
    url: String,
    name: String,
    registered_at: String,
}

/// Scenario timings: written to stderr (uncaptured, so visible without `--nocapture`) and to
/// `target/multihost-timings.txt` as they are measured (a failing run keeps the ones before
/// the failure).
struct Timings {
    file: PathBuf,
    text: String,
}

impl Timings {
    fn new(file: PathBuf) -> Timings {
        let mut t = Timings {
            file,
            text: String::new(),
        };
        t.line(&format!(
            "multihost run (pid {}), TTL {TTL_SECONDS} s, keepalive {:?}",
            std::process::id(),
            keepalive()
        ));
        t
    }

    fn line(&mut self, line: &str) {
        // Straight to the process's stderr: libtest captures eprintln! of passing tests, and
        // these lines belong in CI output.
        let _ = writeln!(std::io::stderr(), "multihost: {line}");
        let _ = writeln!(self.text, "{line}");
        let _ = fs::write(&self.file, &self.text);
    }

    fn scenario(&mut self, n: u32, took: Duration, what: &str) {
        self.line(&format!(
            "scenario {n}: {:.3} s  {what}",
            took.as_secs_f64()
        ));
    }
}

/// The running system: the lab (teardown guard) and the process handles.
struct System {
    lab: Lab,
    valkey: Host,
    orch: Host,
    valkey_bin: PathBuf,
    orch_bin: PathBuf,
    service_bin: PathBuf,
}

impl System {
    fn orch_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.orch.addr, ORCH_PORT)
    }

    /// `GET` on the orchestrator from the switch namespace.
    fn get(&self, path: &str) -> Result<(u16, Vec<u8>), String> {
        netns::http_get(
            &self.lab.switch_ns,
            self.orch_addr(),
            &format!("orchestrator:{ORCH_PORT}"),
            path,
            Duration::from_secs(2),
        )
    }

    /// The orchestrator's list, or why it could not be had.
    fn list(&self) -> Result<Vec<Entry>, String> {
        let (status, body) = self.get("/services")?;
        if status != 200 {
            return Err(format!(
                "GET /services: {status} {}",
                String::from_utf8_lossy(&body)
            ));
        }
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| format!("GET /services: bad JSON ({e})"))?;
        let services = v["services"]
            .as_array()
            .ok_or_else(|| format!("GET /services: no services array in {v}"))?;
        Ok(services
            .iter()
            .map(|s| Entry {
                id: s["id"].as_str().unwrap_or_default().to_owned(),
                url: s["url"].as_str().unwrap_or_default().to_owned(),
                name: s["info"]["display_name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                registered_at: s["registered_at"].to_string(),
            })
            .collect())
    }

    fn start_valkey(&mut self) -> ProcId {
        let valkey = self.valkey.clone();
        let bin = self.valkey_bin.clone();
        let id = self.lab.spawn(
            "valkey",
            &valkey,
            &bin,
            &[
                "--port",
                "6379",
                "--bind",
                "0.0.0.0",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            &[],
            &[],
        );
        // Ready when it answers PING from the switch.
        let addr = SocketAddr::from((valkey.addr, 6379));
        let switch = self.lab.switch_ns.clone();
        poll("Valkey to answer PING", Duration::from_secs(15), || {
            let mut s = netns::connect_in(&switch, addr, Duration::from_secs(1))
                .map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(1)))
                .map_err(|e| e.to_string())?;
            s.write_all(b"PING\r\n").map_err(|e| e.to_string())?;
            let mut buf = [0u8; 7];
            s.read_exact(&mut buf).map_err(|e| e.to_string())?;
            if &buf == b"+PONG\r\n" {
                Ok(())
            } else {
                Err(format!("answered {:?}", String::from_utf8_lossy(&buf)))
            }
        });
        id
    }

    fn start_orchestrator(&mut self) -> ProcId {
        let orch = self.orch.clone();
        let bin = self.orch_bin.clone();
        let ttl = TTL_SECONDS.to_string();
        self.lab.spawn(
            "orchestrator",
            &orch,
            &bin,
            &[
                "--bind",
                "0.0.0.0:9000",
                "--valkey-url",
                "redis://valkey:6379",
                "--ttl-seconds",
                &ttl,
                "--public-url",
                "http://orchestrator:9000",
                "--log-format",
                "json",
            ],
            &[("RUST_LOG", "info")],
            &[
                "ORCHESTRATOR_BIND",
                "VALKEY_URL",
                "ORCHESTRATOR_KEY_PREFIX",
                "ORCHESTRATOR_TTL_SECONDS",
                "ORCHESTRATOR_PUBLIC_URL",
                "ORCHESTRATOR_REGISTRATION_KEY",
            ],
        )
    }

    /// Waits until the orchestrator answers `/health` with 200 (its store reachable).
    fn wait_orchestrator_healthy(&self, within: Duration) -> Duration {
        poll("the orchestrator to be healthy", within, || {
            let (status, body) = self.get("/health")?;
            if status == 200 {
                Ok(())
            } else {
                Err(format!("{status} {}", String::from_utf8_lossy(&body)))
            }
        })
        .1
    }

    fn start_service(&mut self, host: &Host, display_name: &str) -> ProcId {
        let bin = self.service_bin.clone();
        let port = SERVICE_PORT.to_string();
        self.lab.spawn(
            &format!("service-{}", host.name),
            host,
            &bin,
            &[],
            &[
                (
                    "SERVICEKIT_ORCHESTRATOR_URL",
                    "http://orchestrator:9000/services/$register",
                ),
                ("SERVICEKIT_PORT", &port),
                ("SERVICE_DISPLAY_NAME", display_name),
                ("SERVICEKIT_RETRY_DELAY_MS", "200"),
                ("RUST_LOG", "info"),
            ],
            &[
                "SERVICEKIT_HOST",
                "SERVICEKIT_REGISTRATION_KEY",
                "SERVICEKIT_FAIL_ON_ERROR",
                "SERVICEKIT_MAX_RETRIES",
            ],
        )
    }
}

/// Calls `check` every [`POLL`] until it succeeds; panics with the last failure after `within`.
/// Returns the value and how long it took.
fn poll<T>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> (T, Duration) {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return (v, start.elapsed()),
            Err(last) => assert!(
                start.elapsed() < within,
                "timed out after {within:?} waiting for {what}; last: {last}"
            ),
        }
        std::thread::sleep(POLL);
    }
}

fn find<'a>(entries: &'a [Entry], url: &str) -> Option<&'a Entry> {
    entries.iter().find(|e| e.url == url)
}

fn urls(entries: &[Entry]) -> Vec<&str> {
    entries.iter().map(|e| e.url.as_str()).collect()
}

#[test]
fn services_survive_host_network_and_store_faults() {
    assert_eq!(
        netns::euid(),
        0,
        "the multihost test must run as root: it creates network namespaces, veths and a \
         bridge (CI runs scripts/test as root; locally: sudo -E cargo test --test multihost)"
    );
    let profile = profile_dir();
    let orch_bin = built(
        profile.join("orchestrator"),
        "cargo build -p servicekit-orchestrator",
    );
    let service_bin = built(
        profile.join("examples").join("service"),
        "cargo build --example service",
    );
    let valkey_bin = which("valkey-server");
    which("ip");
    which("unshare");
    let target = profile.parent().expect("target dir").to_path_buf();
    let mut timings = Timings::new(target.join("multihost-timings.txt"));
    let test_start = Instant::now();

    // One /24 per run (10.231.<k>.0/24); it never leaves the lab's namespaces anyway.
    let subnet = u8::try_from(std::process::id() % 250 + 1).expect("subnet");
    let mut lab = Lab::new(
        target.join(format!("multihost-logs-{}", std::process::id())),
        subnet,
    );
    let net = |host: u8| Ipv4Addr::new(10, 231, subnet, host);
    let valkey = lab.add_host("valkey", net(10));
    let orch = lab.add_host("orchestrator", net(11));
    let svca = lab.add_host("svca", net(21));
    let svcb = lab.add_host("svcb", net(22));
    lab.write_hosts_files();
    let mut sys = System {
        lab,
        valkey,
        orch,
        valkey_bin,
        orch_bin,
        service_bin,
    };
    timings.line(&format!(
        "lab up in {:.3} s: namespaces {}-*, 10.231.{subnet}.0/24",
        test_start.elapsed().as_secs_f64(),
        sys.lab.prefix
    ));

    let mut valkey_proc = sys.start_valkey();
    let mut orch_proc = sys.start_orchestrator();
    sys.wait_orchestrator_healthy(Duration::from_secs(20));
    let url_a = format!("http://svca:{SERVICE_PORT}");
    let url_b = format!("http://svcb:{SERVICE_PORT}");

    // 1. Both services register under their auto-detected hostnames.
    let started = Instant::now();
    let proc_a = sys.start_service(&svca, "Service A");
    let proc_b = sys.start_service(&svcb, "Service B");
    let (listed, took) = poll("svca and svcb to register", Duration::from_secs(30), || {
        let l = sys.list()?;
        match (find(&l, &url_a), find(&l, &url_b)) {
            (Some(a), Some(b)) => Ok((a.clone(), b.clone(), l.len())),
            _ => Err(format!("listed {:?}", urls(&l))),
        }
    });
    let took = took.max(started.elapsed());
    let (entry_a, entry_b, count) = listed;
    assert_eq!(count, 2, "only the two services are registered");
    assert_ne!(entry_a.id, entry_b.id, "distinct ids");
    assert_eq!(entry_a.name, "Service A");
    assert_eq!(entry_b.name, "Service B");
    for p in [proc_a, proc_b] {
        let log = sys.lab.log_text(p);
        assert!(
            log.contains("host_source=auto-detected"),
            "the host comes from the hostname:\n{log}"
        );
    }
    timings.scenario(
        1,
        took,
        "both services registered as http://svca:8000 and http://svcb:8000",
    );

    // 2. kill -9 svca: its entry expires within the TTL; svcb stays, with the same id.
    let killed = Instant::now();
    sys.lab.signal(proc_a, SIGKILL);
    let bound = TTL + Duration::from_secs(3);
    let (_, took) = poll("svca's entry to expire", bound, || {
        let l = sys.list()?;
        let b = find(&l, &url_b).map(|b| b.id.clone());
        assert_eq!(
            b.as_deref(),
            Some(entry_b.id.as_str()),
            "svcb must stay listed with its id while svca expires: {l:?}"
        );
        match find(&l, &url_a) {
            Some(_) => Err("svca still listed".into()),
            None => Ok(()),
        }
    });
    let took = took.max(killed.elapsed());
    assert!(
        sys.lab.try_wait(proc_a).is_some(),
        "svca was killed with SIGKILL"
    );
    timings.scenario(
        2,
        took,
        &format!(
            "svca gone after kill -9 (TTL {TTL_SECONDS} s, bound {bound:?}); svcb kept its id"
        ),
    );

    // 3. svcb's link down for longer than the TTL: it expires. Up again: it registers again,
    //    with the same id.
    let down = Instant::now();
    sys.lab.set_link(&svcb, false);
    let (_, expired) = poll(
        "svcb's entry to expire while its link is down",
        TTL + Duration::from_secs(3),
        || {
            let l = sys.list()?;
            match find(&l, &url_b) {
                Some(_) => Err("svcb still listed".into()),
                None => Ok(()),
            }
        },
    );
    // The fault lasts longer than the TTL, whenever the expiry was observed.
    let fault = TTL + Duration::from_millis(500);
    if let Some(rest) = fault.checked_sub(down.elapsed()) {
        std::thread::sleep(rest);
    }
    let link_down_for = down.elapsed();
    let up = Instant::now();
    sys.lab.set_link(&svcb, true);
    // Each keepalive ping is bounded by the keepalive interval, so a ping stuck on a dead
    // connection gives up and the next one (on a fresh connection) gets the 404 and
    // re-registers: within about one interval of the link coming back. The slack covers the
    // ping timeout itself and a loaded 2-core machine.
    let bound = keepalive() * 2 + Duration::from_millis(1500);
    let (back, took) = poll(
        "svcb to register again after its link came back",
        bound,
        || {
            let l = sys.list()?;
            find(&l, &url_b)
                .cloned()
                .ok_or_else(|| format!("listed {:?}", urls(&l)))
        },
    );
    let took = took.max(up.elapsed());
    assert_eq!(back.id, entry_b.id, "svcb keeps its id across the outage");
    timings.scenario(
        3,
        took,
        &format!(
            "svcb registered again (same id) after its link came back (bound {bound:?}); \
             it expired {:.3} s after the link went down, link down {:.3} s",
            expired.as_secs_f64(),
            link_down_for.as_secs_f64()
        ),
    );
    let entry_b = back;

    // 4. Valkey restarts without persistence: svcb (svca is dead) registers again.
    let killed = Instant::now();
    sys.lab.signal(valkey_proc, SIGKILL);
    sys.lab.wait_exit(valkey_proc, Duration::from_secs(10));
    valkey_proc = sys.start_valkey();
    let bound = TTL + Duration::from_secs(4);
    let (back, took) = poll(
        "svcb to register again after Valkey restarted empty",
        bound,
        || {
            let l = sys.list()?;
            assert!(find(&l, &url_a).is_none(), "svca is dead: {l:?}");
            find(&l, &url_b)
                .cloned()
                .ok_or_else(|| format!("listed {:?}", urls(&l)))
        },
    );
    let since_kill = killed.elapsed();
    assert_ne!(
        back.id, entry_b.id,
        "a fresh id: nothing binds the old one to svcb's URL after Valkey lost its data"
    );
    assert_ne!(
        back.registered_at, entry_b.registered_at,
        "a new registration (Valkey restarted empty)"
    );
    timings.scenario(
        4,
        took,
        &format!(
            "svcb registered again (new id) after Valkey restarted empty (bound {bound:?}); \
             {:.3} s since the kill",
            since_kill.as_secs_f64()
        ),
    );
    let entry_b = back;

    // 5. The orchestrator restarts (Valkey keeps the state): every successful listing during
    //    and after the restart still has svcb.
    let term = Instant::now();
    sys.lab.signal(orch_proc, SIGTERM);
    let mut ok_polls = 0u32;
    let mut failed_polls = 0u32;
    let mut restarted_at: Option<Instant> = None;
    let mut back_at: Option<Instant> = None;
    let mut stopped_after = Duration::ZERO;
    let watch_after_back = TTL + Duration::from_millis(1500);
    loop {
        match sys.list() {
            Ok(l) => {
                ok_polls += 1;
                let b = find(&l, &url_b);
                assert_eq!(
                    b.map(|b| b.id.as_str()),
                    Some(entry_b.id.as_str()),
                    "svcb disappeared during the orchestrator restart ({:.3} s after SIGTERM): {l:?}",
                    term.elapsed().as_secs_f64()
                );
                if restarted_at.is_some() && back_at.is_none() {
                    back_at = Some(Instant::now());
                }
            }
            Err(_) => failed_polls += 1,
        }
        if restarted_at.is_none() {
            if let Some(status) = sys.lab.try_wait(orch_proc) {
                assert!(
                    status.success(),
                    "the orchestrator exits 0 on SIGTERM: {status}"
                );
                stopped_after = term.elapsed();
                orch_proc = sys.start_orchestrator();
                restarted_at = Some(Instant::now());
            } else {
                assert!(
                    term.elapsed() < Duration::from_secs(15),
                    "the orchestrator did not exit within 15 s of SIGTERM"
                );
            }
        } else if let Some(back) = back_at {
            if back.elapsed() >= watch_after_back {
                break;
            }
        } else {
            assert!(
                term.elapsed() < Duration::from_secs(30),
                "the restarted orchestrator did not answer within 15 s"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let back = back_at.expect("answered again");
    let outage = back.duration_since(term);
    timings.scenario(
        5,
        outage,
        &format!(
            "orchestrator restart: answering again {:.3} s after SIGTERM (stopped after {:.3} s); \
             svcb in all {ok_polls} successful lists ({failed_polls} failed while down), \
             watched {watch_after_back:?} after",
            outage.as_secs_f64(),
            stopped_after.as_secs_f64()
        ),
    );

    // 6. SIGTERM svcb: its entry is gone while the process still runs.
    //
    // Sound ordering without clocks: each round reads the process state, lists, then reads
    // the state again. "Absent in a list, then still running" proves the entry went first;
    // "exited, then present in a list" proves the opposite. To make the first outcome
    // observable rather than a race against a fast exit, a connection to svcb with a request
    // head half sent keeps its graceful drain (which comes after deregistration) waiting;
    // it is dropped once the answer is known. If no proof either way comes before the exit,
    // the logs decide: the service logs `deregistration.success` only after the orchestrator
    // answered the DELETE, which it does after removing the entry, and exits after that.
    let svc_addr = SocketAddr::from((svcb.addr, SERVICE_PORT));
    let mut hold = netns::connect_in(&sys.lab.switch_ns, svc_addr, Duration::from_secs(2))
        .expect("connect to svcb");
    hold.write_all(b"GET /health HTTP/1.1\r\nHost: svcb\r\n")
        .expect("half a request to svcb");
    let mut hold = Some(hold);
    let sigterm = Instant::now();
    sys.lab.signal(proc_b, SIGTERM);
    let mut gone_while_running: Option<Duration> = None;
    let exit_status;
    loop {
        let before = sys.lab.try_wait(proc_b);
        let listed = sys.list();
        let after = sys.lab.try_wait(proc_b);
        if let Ok(l) = &listed {
            let present = find(l, &url_b).is_some();
            assert!(
                !(present && before.is_some()),
                "svcb exited ({before:?}) while still listed: {l:?}"
            );
            if !present && after.is_none() && gone_while_running.is_none() {
                gone_while_running = Some(sigterm.elapsed());
                hold = None; // let it drain and exit
            }
        }
        if let Some(status) = after {
            exit_status = status;
            break;
        }
        assert!(
            sigterm.elapsed() < Duration::from_secs(20),
            "svcb did not exit within 20 s of SIGTERM"
        );
        if gone_while_running.is_none() && sigterm.elapsed() > Duration::from_secs(5) {
            hold = None; // do not hold the drain forever; the logs will decide
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let exited = sigterm.elapsed();
    drop(hold);
    assert!(
        exit_status.success(),
        "svcb exits 0 on SIGTERM: {exit_status}"
    );
    let l = poll(
        "a listing after svcb exited",
        Duration::from_secs(5),
        || sys.list(),
    )
    .0;
    assert!(find(&l, &url_b).is_none(), "svcb deregistered: {l:?}");
    let svc_log = sys.lab.log_text(proc_b);
    let dereg = svc_log
        .lines()
        .find(|l| l.contains("deregistration.success"))
        .unwrap_or_else(|| panic!("svcb logged no deregistration.success:\n{svc_log}"));
    assert!(
        dereg.contains("already_gone=false"),
        "svcb's own DELETE removed the entry: {dereg}"
    );
    let orch_log = sys.lab.log_text(orch_proc);
    assert!(
        orch_log
            .lines()
            .any(|l| l.contains("service.deregistered") && l.contains(&entry_b.id)),
        "the orchestrator logged svcb's deregistration:\n{orch_log}"
    );
    let how = match gone_while_running {
        Some(t) => format!(
            "entry gone {:.3} s after SIGTERM while svcb still ran (observed), exit at {:.3} s",
            t.as_secs_f64(),
            exited.as_secs_f64()
        ),
        None => format!(
            "entry gone before exit (by the logs: deregistration.success before exit), \
             exit at {:.3} s",
            exited.as_secs_f64()
        ),
    };
    timings.scenario(6, gone_while_running.unwrap_or(exited), &how);

    let _ = valkey_proc;
    timings.line(&format!(
        "all scenarios passed in {:.3} s",
        test_start.elapsed().as_secs_f64()
    ));
}
