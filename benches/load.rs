//! Load benchmark: the real orchestrator (its own process, on a real `valkey-server`) driven
//! over HTTP/1.1 keep-alive connections, and — in the same run — Valkey itself driven with the
//! same command one ping sends, so the result is a ratio that holds on a noisy machine.
//!
//! ```sh
//! cargo bench --bench load                      # 100k registrations, 64 connections, 10 s
//! LOAD_N=10000 LOAD_SECS=5 cargo bench --bench load
//! cargo bench --bench load -- --test            # smoke: 300 registrations, 1 s
//! ```
//!
//! It starts everything it needs: a `valkey-server` on a free port, and the orchestrator as a
//! child process (this same binary re-run with `--serve-orchestrator`) so that its peak RSS is
//! its own. Reported: pings/s, p50/p99/p99.9 latency, errors, the orchestrator's RSS before
//! and after the ping phase and its peak, Valkey memory per registration (`INFO memory`),
//! Valkey's own throughput for the ping script over the same number of connections, and the
//! time to list all entries and one display name's entries at 10k and 100k.

// The child-process orchestrator helpers of common.rs: this bench has its own (Config::for_tests).
#[allow(dead_code)]
mod common;
#[allow(dead_code)]
#[path = "../orchestrator/tests/support/valkey.rs"]
mod valkey;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::store::ValkeyStore;
use ulid::Ulid;

use common::{connect, cores, env_num, ping_phase, rss, send, used_memory, Reply, Resp};

const NAMES: usize = 100;
const CONNECTIONS: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--serve-orchestrator") {
        return serve_orchestrator();
    }
    let quick = common::quick(&args);
    let n = if quick {
        300
    } else {
        env_num("LOAD_N", 100_000)
    };
    let secs = if quick { 1 } else { env_num("LOAD_SECS", 10) } as u64;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(n, Duration::from_secs(secs)));
}

/// The orchestrator process: serves until stdin closes.
fn serve_orchestrator() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut config = Config::for_tests();
        config.valkey_url = std::env::var("VALKEY_URL").ok();
        config.ttl_seconds = 3600;
        let running = servicekit_orchestrator::server::start(config)
            .await
            .expect("orchestrator starts");
        println!("listening {}", running.local_addr());
        // Exit when the parent closes our stdin.
        let _ = tokio::task::spawn_blocking(|| {
            let mut buf = [0u8; 1];
            let _ = std::io::Read::read(&mut std::io::stdin(), &mut buf);
        })
        .await;
        running.shutdown().await;
    });
}

async fn run(n: usize, duration: Duration) {
    let valkey = valkey::ValkeyServer::new();
    let exe = std::env::current_exe().expect("own path");
    let mut orch = Command::new(exe)
        .arg("--serve-orchestrator")
        .env("VALKEY_URL", valkey.url())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("orchestrator process");
    let pid = orch.id();
    let addr = {
        let stdout = orch.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("listening line");
        line.trim().trim_start_matches("listening ").to_owned()
    };
    println!(
        "machine: {} cores; orchestrator pid {pid} at {addr}; valkey at {}",
        cores(),
        valkey.url()
    );
    let mut redis = Resp::connect(valkey.port()).await;
    let mem_before = used_memory(&mut redis).await;

    // Register, timing the listings on the way at 10k and 100k.
    let mut ids = Vec::with_capacity(n);
    let mut done = 0;
    let started = Instant::now();
    for checkpoint in [10_000, 100_000, n] {
        let upto = checkpoint.min(n);
        if upto <= done {
            continue;
        }
        ids.extend(
            common::register_range(
                &addr,
                done..upto,
                CONNECTIONS,
                registration,
                &Arc::default(),
            )
            .await,
        );
        done = upto;
        if upto == 10_000 || upto == 100_000 {
            list_timings(&addr, upto).await;
        }
    }
    println!(
        "registered {n} in {:.1} s ({:.0}/s over {CONNECTIONS} connections)",
        started.elapsed().as_secs_f64(),
        n as f64 / started.elapsed().as_secs_f64()
    );
    if n < 10_000 {
        list_timings(&addr, n).await;
    }
    let mem_after = used_memory(&mut redis).await;
    println!(
        "valkey memory: {} → {} bytes, {:.0} bytes per registration (info ≈ 200 bytes)",
        mem_before,
        mem_after,
        (mem_after.saturating_sub(mem_before)) as f64 / n as f64
    );

    // Ping at the highest rate the orchestrator sustains.
    let rss_before = rss(pid, "VmRSS");
    let ids = Arc::new(ids);
    let (pings, errors, mut latencies) =
        ping_phase(&addr, ids.clone(), duration, CONNECTIONS).await;
    let rss_after = rss(pid, "VmRSS");
    let rate = pings as f64 / duration.as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "orchestrator pings: {rate:.0}/s over {CONNECTIONS} connections for {:?}; errors {errors}; latency p50 {} µs, p99 {} µs, p99.9 {} µs",
        duration,
        pct(0.50),
        pct(0.99),
        pct(0.999)
    );
    println!(
        "orchestrator RSS: {} KiB before the ping phase, {} KiB after, peak {} KiB",
        rss_before,
        rss_after,
        rss(pid, "VmHWM")
    );

    // Valkey's own throughput for the command one ping sends, same connection count.
    let store = ValkeyStore::connect(&valkey.url(), "servicekit:", Duration::from_secs(3600))
        .await
        .expect("store");
    let valkey_rate = valkey_ping_rate(&store, valkey.port(), ids, duration).await;
    println!(
        "valkey alone, same ping script: {valkey_rate:.0}/s over {CONNECTIONS} connections; orchestrator/valkey = {:.2}",
        rate / valkey_rate
    );

    drop(orch.stdin.take());
    let _ = orch.wait();
}

fn registration(i: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "url": format!("http://10.{}.{}.{}:8000", i / 65536 % 256, i / 256 % 256, i % 256),
        "info": {
            "display_name": format!("service-{:03}", i % NAMES),
            "version": "1.4.2",
            "description": "Example workload used by the servicekit load benchmark",
            "team": "platform",
            "deployment_env": "production",
            "capabilities": ["http", "grpc"],
            "priority": 5
        }
    }))
    .expect("json")
}

async fn list_timings(addr: &str, n: usize) {
    let mut sender = connect(addr).await;
    for (what, path, expect) in [
        ("all", "/services".to_owned(), n),
        (
            "one display name",
            "/services?display_name=service-042".to_owned(),
            n / NAMES,
        ),
    ] {
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let started = Instant::now();
            let (status, body) = send(&mut sender, "GET", &path, None).await;
            let took = started.elapsed();
            assert_eq!(status, 200);
            let v: Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(v["count"].as_u64(), Some(expect as u64), "{path}");
            best = best.min(took);
        }
        println!(
            "list {what} at {n} registrations: {:.1} ms (best of 5, over HTTP)",
            best.as_secs_f64() * 1000.0
        );
    }
}

async fn valkey_ping_rate(
    store: &ValkeyStore,
    port: u16,
    ids: Arc<Vec<Ulid>>,
    duration: Duration,
) -> f64 {
    let (lua, _, _) = store.ping_command(ids[0]);
    let mut admin = Resp::connect(port).await;
    let sha = match admin.call(&[b"SCRIPT", b"LOAD", lua.as_bytes()]).await {
        Reply::Bulk(sha) => String::from_utf8(sha).expect("sha"),
        other => panic!("SCRIPT LOAD: {other:?}"),
    };
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let (ids, sha, store) = (ids.clone(), sha.clone(), store.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Resp::connect(port).await;
            let mut done = 0usize;
            let mut i = c * 7919;
            while Instant::now() < deadline {
                i = i.wrapping_add(104_729);
                let (_, keys, args) = store.ping_command(ids[i % ids.len()]);
                let numkeys = keys.len().to_string();
                let mut cmd: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes(), numkeys.as_bytes()];
                cmd.extend(keys.iter().map(|k| k.as_bytes()));
                cmd.extend(args.iter().map(|a| a.as_bytes()));
                match conn.call(&cmd).await {
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
    total as f64 / duration.as_secs_f64()
}
