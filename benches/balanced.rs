//! The balanced client's overhead: one GET loop against one real instance over sockets,
//! through a plain hyper-util client straight to the instance (the baseline) and through
//! `BalancedClient` (watch-fed discovery, p2c, load measure, retry policy), in alternating
//! rounds of the same run. The ratio is what the client costs; the goal is ≤ 1.05.
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
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use servicekit::discovery::{BalancedClient, Filter, Watcher};
use servicekit_orchestrator::config::Config;

use common::{connect, env_num, send};

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

/// Runs `LOOPS` loops of `call` for `duration`; returns requests/s and sorted latencies.
async fn drive<F, Fut>(duration: Duration, call: F) -> (f64, Vec<Duration>)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..LOOPS)
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
    all.sort_unstable();
    (rate, all)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

async fn run(duration: Duration, rounds: usize) {
    let orch = servicekit_orchestrator::server::start(Config::for_tests())
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

    let watcher = Watcher::new(&orch.base_url(), Filter::display_name("bench")).expect("watcher");
    tokio::time::timeout(Duration::from_secs(10), watcher.synced())
        .await
        .expect("synced");
    let balanced = BalancedClient::new(watcher.clone());
    let direct: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let target: http::Uri = format!("{instance}/").parse().expect("uri");

    let (mut direct_rates, mut balanced_rates) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (client, uri) = (direct.clone(), target.clone());
        let (rate, lat) = drive(duration, move || {
            let (client, uri) = (client.clone(), uri.clone());
            async move {
                match client.get(uri).await {
                    Ok(res) => {
                        let ok = res.status().is_success();
                        ok && res.into_body().collect().await.is_ok()
                    }
                    Err(_) => false,
                }
            }
        })
        .await;
        println!(
            "round {round}: direct   {rate:>8.0} req/s, p50 {:.0} µs, p99 {:.0} µs",
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        );
        direct_rates.push(rate);

        let client = balanced.clone();
        let (rate, lat) = drive(duration, move || {
            let client = client.clone();
            async move {
                match client.get("/").await {
                    Ok(res) => res.status().is_success(),
                    Err(_) => false,
                }
            }
        })
        .await;
        println!(
            "round {round}: balanced {rate:>8.0} req/s, p50 {:.0} µs, p99 {:.0} µs",
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        );
        balanced_rates.push(rate);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "{LOOPS} loops, {rounds} rounds of {duration:?}: direct {:.0} req/s, balanced {:.0} req/s; cost ratio (direct/balanced) {:.3}",
        mean(&direct_rates),
        mean(&balanced_rates),
        mean(&direct_rates) / mean(&balanced_rates)
    );
    orch.shutdown().await;
}
