//! Listing under load: the orchestrator's memory and its ping latency while 4 clients loop
//! on `GET /services` (every entry) at 100k registrations, on the memory store and on Valkey.
//! The issue it answers: a list-all used to build the whole answer in memory (in the memory
//! store under its one lock), so looping lists moved RSS by hundreds of MB and ping p99 from
//! milliseconds to half a second.
//!
//! ```sh
//! cargo bench --bench list_load                        # 100k registrations, 10 s phases
//! LIST_N=20000 LIST_SECS=5 cargo bench --bench list_load
//! cargo bench --bench list_load -- --test              # smoke: 2,000 registrations, 1 s
//! ```
//!
//! For each store it starts the orchestrator as a child process (this binary re-run with
//! `--serve-orchestrator`, so RSS is the orchestrator's own; a `valkey-server` on a free port
//! for the Valkey run), registers N entries (~200-byte info) over 64 connections, then runs
//! two phases of the same length: pings alone over 16 connections, then the same pings while
//! 4 more connections loop on `GET /services`. Reported: ping p50/p99 of both phases, lists
//! completed, and the orchestrator's RSS at rest, its highest sample (every 50 ms) during the
//! list phase, and its peak (`VmHWM`). It only uses what every version of the orchestrator
//! has (flags through environment variables), so the same file measures an older build too.

#[allow(dead_code)]
mod common;
#[allow(dead_code)]
#[path = "../orchestrator/tests/support/valkey.rs"]
mod valkey;

use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{connect, env_num, rss, send};
use serde_json::json;

const REGISTER_CONNECTIONS: usize = 64;
const PING_CONNECTIONS: usize = 16;
const LISTERS: usize = 4;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--serve-orchestrator") {
        return common::serve_orchestrator();
    }
    let quick = common::quick(&args);
    let n = if quick {
        2_000
    } else {
        env_num("LIST_N", 100_000)
    };
    let secs = if quick { 1 } else { env_num("LIST_SECS", 10) } as u64;
    let stores = std::env::var("LIST_STORES").unwrap_or_else(|_| "memory,valkey".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for store in stores.split(',') {
        let valkey = (store == "valkey").then(valkey::ValkeyServer::new);
        rt.block_on(run(store, valkey.as_ref(), n, Duration::from_secs(secs)));
    }
}

/// The orchestrator as its own process (common::spawn_orchestrator), holding at least `n`
/// registrations for an hour, on `valkey` when given.
fn spawn_orchestrator(valkey: Option<&valkey::ValkeyServer>, n: usize) -> (Child, String) {
    let mut envs = vec![
        ("ORCHESTRATOR_TTL_SECONDS", "3600".to_owned()),
        // Builds with a registration limit must hold all N.
        ("ORCHESTRATOR_MAX_REGISTRATIONS", (n + 1000).to_string()),
    ];
    if let Some(v) = valkey {
        envs.push(("VALKEY_URL", v.url()));
    }
    common::spawn_orchestrator(&envs)
}

async fn run(store: &str, valkey: Option<&valkey::ValkeyServer>, n: usize, phase: Duration) {
    let (mut child, addr) = spawn_orchestrator(valkey, n);
    let pid = child.id();
    let started = Instant::now();
    let ids = common::register_range(
        &addr,
        0..n,
        REGISTER_CONNECTIONS,
        registration,
        &Arc::default(),
    )
    .await;
    let ids: Arc<Vec<String>> = Arc::new(ids.iter().map(ToString::to_string).collect());
    println!(
        "[{store}] registered {n} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let rss_rest = rss(pid, "VmRSS");

    let (alone, _) = ping_phase(&addr, ids.clone(), phase).await;

    let stop = Arc::new(AtomicBool::new(false));
    let lists = Arc::new(AtomicUsize::new(0));
    let list_bytes = Arc::new(AtomicU64::new(0));
    let mut listers = Vec::new();
    for _ in 0..LISTERS {
        let (addr, stop, lists, list_bytes) = (
            addr.clone(),
            stop.clone(),
            lists.clone(),
            list_bytes.clone(),
        );
        listers.push(tokio::spawn(async move {
            let mut sender = connect(&addr).await;
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = send(&mut sender, "GET", "/services", None).await;
                assert_eq!(status, 200, "list all");
                list_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                lists.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut high = 0;
            while !stop.load(Ordering::Relaxed) {
                high = high.max(rss(pid, "VmRSS"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            high
        })
    };
    let (busy, rate) = ping_phase(&addr, ids.clone(), phase).await;
    stop.store(true, Ordering::Relaxed);
    let rss_high = sampler.await.expect("sampler");
    for l in listers {
        l.await.expect("lister");
    }
    let lists = lists.load(Ordering::Relaxed);
    let mb = list_bytes.load(Ordering::Relaxed) as f64 / lists.max(1) as f64 / 1e6;
    println!(
        "[{store}] pings alone: p50 {} µs, p99 {} µs ({:.0}/s over {PING_CONNECTIONS} connections)",
        alone.p50, alone.p99, alone.rate
    );
    println!(
        "[{store}] pings while {LISTERS} clients list all {n}: p50 {} µs, p99 {} µs ({rate:.0}/s); {lists} lists of {mb:.1} MB in {:?}",
        busy.p50, busy.p99, phase
    );
    println!(
        "[{store}] orchestrator RSS: {rss_rest} KiB at rest, {rss_high} KiB highest while listing, peak {} KiB",
        rss(pid, "VmHWM")
    );
    drop(child.stdin.take());
    let _ = child.wait();
}

fn registration(i: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "url": format!("http://10.{}.{}.{}:8000", i / 65536 % 256, i / 256 % 256, i % 256),
        "info": {
            "display_name": format!("service-{:03}", i % 100),
            "version": "1.4.2",
            "description": "Example workload used by the servicekit list benchmark",
            "team": "platform",
            "deployment_env": "production",
            "capabilities": ["http", "grpc"],
            "priority": 5
        }
    }))
    .expect("json")
}

struct Latency {
    p50: u32,
    p99: u32,
    rate: f64,
}

/// Pings over [`PING_CONNECTIONS`] connections, each waiting for its answer, for `duration`.
async fn ping_phase(addr: &str, ids: Arc<Vec<String>>, duration: Duration) -> (Latency, f64) {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for c in 0..PING_CONNECTIONS {
        let (addr, ids) = (addr.to_owned(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(&addr).await;
            let mut lat = Vec::with_capacity(100_000);
            let mut i = c * 7919;
            while Instant::now() < deadline {
                i = i.wrapping_add(104_729);
                let path = format!("/services/{}/$ping", ids[i % ids.len()]);
                let started = Instant::now();
                let (status, _) = send(&mut sender, "PUT", &path, None).await;
                assert_eq!(status, 200, "ping");
                lat.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("task"));
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let rate = lat.len() as f64 / duration.as_secs_f64();
    (
        Latency {
            p50: pct(0.50),
            p99: pct(0.99),
            rate,
        },
        rate,
    )
}
