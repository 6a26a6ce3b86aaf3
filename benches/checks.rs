//! The orchestrator's own health checks (pull): what checking costs it.
//!
//! ```sh
//! cargo bench --bench checks                    # 10k instances every 10 s, then flat out
//! CHECKS_N=2000 CHECKS_SECS=10 cargo bench --bench checks
//! cargo bench --bench checks -- --test          # smoke: 200 instances, short phases
//! ```
//!
//! Knobs: `CHECKS_N` (instances of the steady phase, default 10,000), `CHECKS_INTERVAL` (their
//! interval in seconds, default 10), `CHECKS_SECS` (length of each measured window, default
//! 30), `CHECKS_FLAT_N` (instances of the flat-out phase, checked every second, default
//! 20,000).
//!
//! The orchestrator runs as a child process on the memory store (a check writes to the store
//! only when a status changes, and none does here), so its CPU time from /proc is the cost of
//! checking. Every instance is a URL on one HTTP target in this process
//! (`http://127.0.0.1:PORT/i/N`, checked at `/i/N/health`), which counts the checks it
//! answers. Phases:
//! - steady: N instances every `CHECKS_INTERVAL` s; after one interval of warm-up (first checks
//!   are spread over it), the checks answered and the orchestrator's CPU over the window;
//! - flat out: `CHECKS_FLAT_N` instances every second, more than it can do: checks per
//!   orchestrator CPU-second, the per-core rate;
//! - baseline, same run: a child process doing plain `GET`s on a fresh connection each (as a
//!   check does) at the same target, as fast as it can: GETs per CPU-second of that process.

#[allow(dead_code)]
mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;

use common::{cores, cpu_time, env_num, register_range};

/// Where the target listens, and the interval of the phase's checks: `register_range` takes a
/// plain `fn` for bodies.
static TARGET: OnceLock<String> = OnceLock::new();
static INTERVAL: AtomicUsize = AtomicUsize::new(10);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--serve-orchestrator") {
        return common::serve_orchestrator();
    }
    if let Some(at) = args.iter().position(|a| a == "--baseline-client") {
        return baseline_client(&args[at + 1], &args[at + 2]);
    }
    let quick = common::quick(&args);
    let (n, interval, secs, flat_n) = if quick {
        (200, 1, 2, 200)
    } else {
        (
            env_num("CHECKS_N", 10_000),
            env_num("CHECKS_INTERVAL", 10) as u64,
            env_num("CHECKS_SECS", 30) as u64,
            env_num("CHECKS_FLAT_N", 20_000),
        )
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "machine: {} cores, load average {}",
        cores(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    rt.block_on(async {
        let answered = Arc::new(AtomicUsize::new(0));
        let target = serve_target(answered.clone()).await;
        let window = Duration::from_secs(secs);

        let steady = phase(&target, &answered, n, interval, window).await;
        println!(
            "steady: {n} instances every {interval} s: {:.0} checks/s answered (due: {:.0}/s), \
             orchestrator CPU {:.1} % of a core, {:.1} ms CPU per 1,000 checks",
            steady.checks_per_sec,
            n as f64 / interval as f64,
            steady.cpu_share * 100.0,
            steady.cpu_ms_per_1000,
        );
        let flat = phase(&target, &answered, flat_n, 1, window).await;
        println!(
            "flat out: {flat_n} instances every 1 s: {:.0} checks/s answered, orchestrator \
             CPU {:.2} cores: {:.0} checks per orchestrator CPU-second",
            flat.checks_per_sec, flat.cpu_share, flat.per_cpu_sec,
        );
        let base = baseline(&target, window);
        println!(
            "baseline: plain GETs, a fresh connection each: {:.0} GETs per client CPU-second; \
             checks per CPU-second / baseline = {:.2}",
            base,
            flat.per_cpu_sec / base
        );
    });
}

/// What one phase measured.
struct Measured {
    checks_per_sec: f64,
    /// Orchestrator CPU seconds per second (1.0 = one core).
    cpu_share: f64,
    cpu_ms_per_1000: f64,
    per_cpu_sec: f64,
}

/// Starts an orchestrator, registers `n` instances checked every `interval` s, lets one
/// interval pass (first checks are jittered over it), then measures for `window`.
async fn phase(
    target: &str,
    answered: &Arc<AtomicUsize>,
    n: usize,
    interval: u64,
    window: Duration,
) -> Measured {
    let (mut child, addr) = common::spawn_orchestrator(&[
        ("ORCHESTRATOR_TTL_SECONDS", "3600".into()),
        ("ORCHESTRATOR_MAX_REGISTRATIONS", (n + 10).to_string()),
    ]);
    let pid = child.id().to_string();
    // Every phase checks the same target.
    let _ = TARGET.set(target.to_owned());
    INTERVAL.store(interval as usize, Ordering::Relaxed);
    let done = Arc::new(AtomicUsize::new(0));
    register_range(&addr, 0..n, 32, body, &done).await;
    tokio::time::sleep(Duration::from_secs(interval) + Duration::from_millis(500)).await;
    let (checks0, cpu0, t0) = (
        answered.load(Ordering::Relaxed),
        cpu_time(&pid),
        Instant::now(),
    );
    tokio::time::sleep(window).await;
    let checks = answered.load(Ordering::Relaxed) - checks0;
    let cpu = (cpu_time(&pid) - cpu0).as_secs_f64();
    let secs = t0.elapsed().as_secs_f64();
    drop(child.stdin.take());
    let _ = child.wait();
    assert!(checks > 0, "no check reached the target in {secs:.1} s");
    Measured {
        checks_per_sec: checks as f64 / secs,
        cpu_share: cpu / secs,
        cpu_ms_per_1000: cpu * 1e6 / checks as f64,
        per_cpu_sec: checks as f64 / cpu.max(1e-9),
    }
}

fn body(i: usize) -> Vec<u8> {
    let target = TARGET.get().expect("target set");
    serde_json::to_vec(&json!({
        "url": format!("{target}/i/{i}"),
        "info": {"display_name": format!("checked-{}", i % 100)},
        "check": {"http": "/health", "interval_seconds": INTERVAL.load(Ordering::Relaxed),
                  "timeout_seconds": 1},
    }))
    .expect("json")
}

/// An HTTP target answering 200 to everything, counting the answers; its base URL.
async fn serve_target(answered: Arc<AtomicUsize>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let answered = answered.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    answered.fetch_add(1, Ordering::Relaxed);
                    async {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from("ok"))))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// Runs the baseline client as a child process for `window`; its GETs per CPU-second.
fn baseline(target: &str, window: Duration) -> f64 {
    let exe = std::env::current_exe().expect("own path");
    let out = std::process::Command::new(exe)
        .args(["--baseline-client", target, &window.as_secs().to_string()])
        .output()
        .expect("baseline client");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("baseline said {text:?}"))
}

/// The baseline process: 16 loops of GET on a fresh connection each, for `secs`; prints GETs
/// per CPU-second of this process.
fn baseline_client(target: &str, secs: &str) {
    let secs: u64 = secs.parse().expect("seconds");
    let addr = target.trim_start_matches("http://").to_owned();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let done = Arc::new(AtomicUsize::new(0));
    let cpu0 = cpu_time("self");
    rt.block_on(async {
        let until = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (addr, done) = (addr.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    let mut sender = common::connect(&addr).await;
                    let (status, _) = common::send(&mut sender, "GET", "/i/0/health", None).await;
                    assert_eq!(status, 200);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
    let cpu = (cpu_time("self") - cpu0).as_secs_f64();
    println!("{:.0}", done.load(Ordering::Relaxed) as f64 / cpu.max(1e-9));
}
