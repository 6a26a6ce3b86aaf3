//! The balanced client's overhead: one GET loop against one real instance over sockets,
//! through a plain hyper-util client straight to the instance (the baseline) and through
//! `BalancedClient` (watch-fed discovery, p2c, load measure, retry policy), in alternating
//! rounds of the same run. The ratio is what the client costs; the goal is ≤ 1.05.
//!
//! Both sides get the same transport: TCP_NODELAY, the same pool (idle timeout 4 s, one
//! connection per concurrent loop, reused), an empty `Full<Bytes>` body, the answer's body
//! collected into `Bytes`. Besides the throughput, each round reports the process's CPU time
//! per request (user + system, server included), which other load on the machine disturbs
//! less than the throughput, and a second phase runs ONE loop each way (a moderate rate, the
//! machine not saturated) for the latency a caller sees: p50/p99 direct vs balanced.
//!
//! ```sh
//! cargo bench --bench balanced                  # 3 rounds of 5 s each way, 16 concurrent loops
//! BAL_SECS=10 BAL_ROUNDS=5 cargo bench --bench balanced
//! cargo bench --bench balanced -- --test        # smoke: 1 round of 1 s
//! ```

#[allow(dead_code)]
mod common;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use servicekit::discovery::{BalancedClient, Filter, Watcher};
use servicekit_orchestrator::config::Config;

use common::{connect, cpu_time, env_num, send};

/// Concurrent request loops.
const LOOPS: usize = 16;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = common::quick(&args);
    let secs = if quick { 1 } else { env_num("BAL_SECS", 5) } as u64;
    let rounds = if quick { 1 } else { env_num("BAL_ROUNDS", 3) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(Duration::from_secs(secs), rounds));
}

/// One round's result.
struct Round {
    rate: f64,
    /// CPU µs per request (the whole process: client, server, orchestrator idle).
    cpu_us: f64,
    /// Sorted.
    latencies: Vec<Duration>,
}

/// Runs `loops` loops of `call` for `duration`.
async fn drive<F, Fut>(loops: usize, duration: Duration, call: F) -> Round
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let cpu = cpu_time("self");
    let tasks: Vec<_> = (0..loops)
        .map(|_| {
            let (call, stop) = (call.clone(), stop.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    assert!(call().await, "a request failed");
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("loop"));
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    let cpu_us = (cpu_time("self") - cpu).as_secs_f64() * 1e6 / all.len().max(1) as f64;
    all.sort_unstable();
    Round {
        rate,
        cpu_us,
        latencies: all,
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

async fn run(duration: Duration, rounds: usize) {
    // The instance is registered once, without pings: an hour's TTL keeps it in the watch for
    // any BAL_SECS × BAL_ROUNDS (with the default 30 s it expired mid-run and the balanced
    // side then failed with "no instance ready").
    let mut config = Config::for_tests();
    config.ttl_seconds = 3600;
    let orch = servicekit_orchestrator::server::start(config)
        .await
        .expect("orchestrator starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let instance = format!("http://{}", listener.local_addr().expect("address"));
    let app = Router::new().route("/", get(|| async { "hello" }));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut sender = connect(&orch.local_addr().to_string()).await;
    let body = json!({"url": instance, "info": {"display_name": "bench"}});
    let (status, _) = send(
        &mut sender,
        "POST",
        "/services/$register",
        Some(serde_json::to_vec(&body).expect("json")),
    )
    .await;
    assert!(status < 300, "register: {status}");

    let watcher = Watcher::new(orch.base_url(), Filter::display_name("bench")).expect("watcher");
    tokio::time::timeout(Duration::from_secs(10), watcher.synced())
        .await
        .expect("synced");
    let balanced = BalancedClient::new(watcher.clone());
    // The same transport settings as BalancedClient's pool (see the module docs).
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let direct: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(4))
        .build(http);
    let target: http::Uri = format!("{instance}/").parse().expect("uri");

    let direct_call = move || {
        let (client, uri) = (direct.clone(), target.clone());
        async move {
            match client.get(uri).await {
                Ok(res) => {
                    let ok = res.status().is_success();
                    ok && res
                        .into_body()
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .is_ok()
                }
                Err(e) => {
                    eprintln!("direct: {e:?}");
                    false
                }
            }
        }
    };
    let balanced_call = move || {
        let client = balanced.clone();
        async move {
            match client.get("/").await {
                Ok(res) => res.status().is_success(),
                Err(e) => {
                    eprintln!("balanced: {e}");
                    false
                }
            }
        }
    };

    for (loops, phase) in [(LOOPS, "throughput"), (1, "latency")] {
        let mut sums = [[0.0; 2]; 2];
        for round in 0..rounds {
            // Alternate which side goes first, so neither always follows the other's warm-up.
            let (d, b) = if round % 2 == 0 {
                let d = drive(loops, duration, direct_call.clone()).await;
                (d, drive(loops, duration, balanced_call.clone()).await)
            } else {
                let b = drive(loops, duration, balanced_call.clone()).await;
                (drive(loops, duration, direct_call.clone()).await, b)
            };
            for (i, (name, r)) in [("direct  ", &d), ("balanced", &b)].into_iter().enumerate() {
                println!(
                    "{phase} round {round}: {name} {:>8.0} req/s, {:>5.1} µs CPU/req, p50 {:.0} µs, p99 {:.0} µs",
                    r.rate,
                    r.cpu_us,
                    pct(&r.latencies, 0.5),
                    pct(&r.latencies, 0.99)
                );
                sums[i][0] += r.rate;
                sums[i][1] += r.cpu_us;
            }
            println!(
                "{phase} round {round}: ratio (direct/balanced) {:.3}, CPU/req ratio (balanced/direct) {:.3}",
                d.rate / b.rate,
                b.cpu_us / d.cpu_us
            );
        }
        println!(
            "{phase}: {loops} loop(s), {rounds} rounds of {duration:?}: direct {:.0} req/s {:.1} µs CPU/req, balanced {:.0} req/s {:.1} µs CPU/req; cost ratio (direct/balanced) {:.3}, CPU/req ratio {:.3}",
            sums[0][0] / rounds as f64,
            sums[0][1] / rounds as f64,
            sums[1][0] / rounds as f64,
            sums[1][1] / rounds as f64,
            sums[0][0] / sums[1][0],
            sums[1][1] / sums[0][1]
        );
    }
    orch.shutdown().await;
}
