//! Calls the instances of one service at a steady rate through servicekit's balanced client.
//!
//! ```sh
//! SERVICEKIT_ORCHESTRATOR_URL=http://127.0.0.1:9000 cargo run --example consumer --features discovery
//! ```
//!
//! - `CONSUMER_TARGET`: the display name to call (default `svca`);
//! - `CONSUMER_RATE`: requests per second (default 20), sent concurrently, so a slow instance
//!   does not lower the rate;
//! - `CONSUMER_PATH`: the path and query requested (default `/`).
//!
//! Each answer is logged at debug (`consumer.response instance=... status=...`), a summary of
//! the last counts every 5 s at info (`consumer.progress`), a failed request (no answer, or a
//! status of 400 or more) at warn (`consumer.request_failed`). SIGTERM or Ctrl-C stops sending,
//! waits for the requests in flight, logs `consumer.summary requests=N failed=M` and exits 0.

use std::collections::BTreeMap;
use std::error::Error;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use servicekit::discovery::{BalancedClient, Filter, ServedBy, Watcher};
use servicekit::error::ErrorChain;
use tokio::time::MissedTickBehavior;
use tracing_subscriber::EnvFilter;

#[derive(Default)]
struct Stats {
    requests: u64,
    failed: u64,
    per_instance: BTreeMap<String, u64>,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

async fn run() -> Result<(), Box<dyn Error>> {
    let target = env_or("CONSUMER_TARGET", "svca");
    let rate_text = env_or("CONSUMER_RATE", "20");
    let rate: u32 = rate_text
        .trim()
        .parse()
        .ok()
        .filter(|r| (1..=100_000).contains(r))
        .ok_or_else(|| {
            format!("CONSUMER_RATE={rate_text:?}: expected requests per second, 1 to 100000")
        })?;
    let path = env_or("CONSUMER_PATH", "/");
    if !path.starts_with('/') {
        return Err(format!("CONSUMER_PATH={path:?}: expected a path starting with '/'").into());
    }
    // Installed first, so a signal during start-up is not lost.
    let stop = servicekit::signal::shutdown_signal()?;
    tokio::pin!(stop);

    let watcher = Watcher::from_env(Filter::display_name(&target))?;
    let client = BalancedClient::new(watcher.clone());
    tracing::info!(target = ?target, rate, path = ?path, "consumer.starting");
    tokio::select! {
        _ = watcher.synced() => {}
        _ = &mut stop => {
            tracing::info!(requests = 0, failed = 0, "consumer.summary");
            return Ok(());
        }
    }
    tracing::info!(instances = watcher.instances().len(), "consumer.synced");

    let stats = Arc::new(Mutex::new(Stats::default()));
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut progress = tokio::time::interval(Duration::from_secs(5));
    progress.tick().await;
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticker.tick() => {
                let (client, stats, path) = (client.clone(), stats.clone(), path.clone());
                in_flight.spawn(async move { call(&client, &path, &stats).await });
            }
            _ = progress.tick() => {
                let s = stats.lock().unwrap_or_else(|p| p.into_inner());
                tracing::info!(
                    requests = s.requests,
                    failed = s.failed,
                    per_instance = ?s.per_instance,
                    state = ?watcher.state(),
                    "consumer.progress"
                );
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
    while in_flight.join_next().await.is_some() {}
    let s = stats.lock().unwrap_or_else(|p| p.into_inner());
    tracing::info!(requests = s.requests, failed = s.failed, "consumer.summary");
    Ok(())
}

async fn call(client: &BalancedClient, path: &str, stats: &Mutex<Stats>) {
    let result = client.get(path).await;
    let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
    s.requests += 1;
    match result {
        Ok(res) => {
            let instance = res
                .extensions()
                .get::<ServedBy>()
                .map(|by| by.url.clone())
                .unwrap_or_default();
            let status = res.status();
            tracing::debug!(instance = ?instance, status = status.as_u16(), "consumer.response");
            *s.per_instance.entry(instance.clone()).or_default() += 1;
            if status.is_client_error() || status.is_server_error() {
                s.failed += 1;
                tracing::warn!(instance = ?instance, status = status.as_u16(), "consumer.request_failed");
            }
        }
        Err(e) => {
            s.failed += 1;
            tracing::warn!(error = %ErrorChain(&e), "consumer.request_failed");
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", ErrorChain(&*e));
            ExitCode::FAILURE
        }
    }
}
