//! Discovery end to end: the `service` example as real processes, the orchestrator's watch
//! feed, and consumers (the `consumer` example as a process, or the library's `Watcher` and
//! `BalancedClient` in this process) calling them while instances restart, crash, and the
//! orchestrator goes away. The examples are built by `scripts/test` before the tests run.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use servicekit::discovery::{BalancedClient, Filter, WatchState, Watcher};
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server::{self, Running};
use support::process::{consumer, consumer_summary, example, Process};
use support::*;

/// A `service` example process registered as `name` with the orchestrator at `base`.
struct Instance {
    process: Process,
    url: String,
}

impl Instance {
    async fn start(api: &http::Api, name: &str) -> Instance {
        let port = free_port();
        let mut cmd = example("service");
        cmd.env("SERVICEKIT_ORCHESTRATOR_URL", api.base())
            .env("SERVICEKIT_HOST", "127.0.0.1")
            .env("SERVICEKIT_PORT", port.to_string())
            .env("SERVICEKIT_RETRY_DELAY_MS", "100")
            .env("SERVICE_DISPLAY_NAME", name)
            .env("RUST_LOG", "warn");
        let process = Process::spawn(cmd);
        let url = format!("http://127.0.0.1:{port}");
        registered(api, &url, Duration::from_secs(30)).await;
        Instance { process, url }
    }
}

/// Waits until the consumer has logged an answer from `url`.
async fn answered_by(consumer: &Process, url: &str, within: Duration) {
    eventually(&format!("an answer from {url}"), within, || async {
        consumer
            .printed(|l| l.contains("consumer.response") && l.contains(url))
            .then_some(())
    })
    .await
}

/// Three instances of one name, each restarted in turn (SIGTERM, then a new one on a new
/// port), three full rotations, while the consumer calls them at 200 requests/s: not one
/// request fails. The layer deregisters before it drains, the watch feed takes the instance
/// out of the consumer's set, and a request already on its way to it is retried elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_costs_the_consumer_no_request() {
    let (orch, api) = orchestrator(30, None).await;
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(Instance::start(&api, "svca").await);
    }
    let consumer = consumer(api.base(), "svca", 200);
    for i in &instances {
        answered_by(&consumer, &i.url, Duration::from_secs(30)).await;
    }
    let mut served = Vec::new();
    for _rotation in 0..3 {
        for slot in instances.iter_mut() {
            let old = std::mem::replace(
                slot,
                // Started before the old one stops: `registered` waits for it.
                Instance::start(&api, "svca").await,
            );
            let (status, lines) = old.process.terminate(Duration::from_secs(20)).await;
            assert!(status.success(), "{status:?}\n{}", lines.join("\n"));
            assert!(
                entries_for(&api, &old.url).await.is_empty(),
                "{} deregistered on SIGTERM",
                old.url
            );
            answered_by(&consumer, &slot.url, Duration::from_secs(30)).await;
            served.push(old.url);
        }
    }
    let (requests, failed, lines) = consumer_summary(consumer).await;
    let failures: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("consumer.request_failed"))
        .collect();
    assert_eq!(failed, 0, "failed requests: {failures:#?}");
    assert!(requests > 0, "the consumer sent requests");
    println!(
        "rolling restart: {requests} requests, {failed} failed, {} instances replaced",
        served.len()
    );
    orch.shutdown().await;
}

/// Counts of a load loop run through a `BalancedClient` in this process.
#[derive(Default)]
struct Load {
    ok: AtomicUsize,
    failed: AtomicUsize,
    stop: AtomicBool,
    errors: std::sync::Mutex<Vec<String>>,
}

/// GETs `/` through `client` every 20 ms (four at a time) until `load.stop`.
fn run_load(client: BalancedClient, load: Arc<Load>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut workers = Vec::new();
        for _ in 0..4 {
            let (client, load) = (client.clone(), load.clone());
            workers.push(tokio::spawn(async move {
                while !load.stop.load(Ordering::Relaxed) {
                    match client.get("/").await {
                        Ok(res) if res.status().is_success() => {
                            load.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(res) => {
                            load.failed.fetch_add(1, Ordering::Relaxed);
                            let mut errors = load.errors.lock().unwrap_or_else(|e| e.into_inner());
                            errors.push(format!("status {}", res.status()));
                        }
                        Err(e) => {
                            load.failed.fetch_add(1, Ordering::Relaxed);
                            let mut errors = load.errors.lock().unwrap_or_else(|e| e.into_inner());
                            errors.push(e.to_string());
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        for w in workers {
            let _ = w.await;
        }
    })
}

impl Load {
    /// Waits until `n` more requests succeeded.
    async fn advance(&self, n: usize, within: Duration) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        eventually("requests to succeed", within, || async {
            (self.ok.load(Ordering::Relaxed) >= target).then_some(())
        })
        .await
    }

    async fn finish(&self, task: tokio::task::JoinHandle<()>) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        task.await.expect("load task");
        let errors = self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let failed = self.failed.load(Ordering::Relaxed);
        assert_eq!(failed, 0, "failed requests: {errors:#?}");
        (self.ok.load(Ordering::Relaxed), failed)
    }
}

/// `kill -9` of one instance: its idempotent requests are retried on another one, so none
/// fails; it leaves the watcher's set when its entry expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_costs_no_idempotent_request_and_leaves_the_set() {
    let (orch, api) = orchestrator(3, None).await;
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(Instance::start(&api, "svcb").await);
    }
    let watcher = Watcher::new(api.base(), Filter::display_name("svcb")).expect("watcher");
    tokio::time::timeout(Duration::from_secs(10), watcher.synced())
        .await
        .expect("synced");
    assert_eq!(watcher.instances().len(), 3, "{:?}", watcher.instances());
    let load = Arc::new(Load::default());
    let task = run_load(BalancedClient::new(watcher.clone()), load.clone());
    load.advance(50, Duration::from_secs(20)).await;

    let victim = instances.remove(0);
    let victim_url = victim.url.clone();
    let mut victim = victim.process;
    victim.kill();
    load.advance(50, Duration::from_secs(20)).await;
    eventually(
        "the crashed instance to leave the set",
        Duration::from_secs(20),
        || async { (!watcher.instances().iter().any(|i| i.url == victim_url)).then_some(()) },
    )
    .await;
    assert_eq!(watcher.instances().len(), 2);
    load.advance(50, Duration::from_secs(20)).await;
    let (ok, _) = load.finish(task).await;
    println!("crash: {ok} requests, 0 failed");
    orch.shutdown().await;
}

/// Two orchestrator replicas on one Valkey with one key prefix.
async fn replica(valkey: &valkey::ValkeyServer, prefix: &str, port: u16, ttl: u64) -> Running {
    let mut config = Config::for_tests();
    config.bind = format!("127.0.0.1:{port}").parse().expect("address");
    config.ttl_seconds = ttl;
    config.valkey_url = Some(valkey.url());
    config.key_prefix = prefix.to_owned();
    config.admin_key = Some(ADMIN_KEY.to_owned());
    server::start(config).await.expect("orchestrator starts")
}

/// The orchestrator stops: the watcher keeps its instances (and says it is stale), requests
/// keep flowing; it comes back: the watcher resyncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_rides_out_an_orchestrator_outage() {
    let valkey = valkey::ValkeyServer::new();
    let prefix = format!("test:{}:", ulid::Ulid::new());
    let port = free_port();
    let orch = replica(&valkey, &prefix, port, 30).await;
    let api = http::Api::new(orch.base_url());
    let mut instances = Vec::new();
    for _ in 0..2 {
        instances.push(Instance::start(&api, "svcc").await);
    }
    let watcher = Watcher::new(api.base(), Filter::display_name("svcc")).expect("watcher");
    tokio::time::timeout(Duration::from_secs(10), watcher.synced())
        .await
        .expect("synced");
    assert_eq!(watcher.instances().len(), 2);
    let load = Arc::new(Load::default());
    let task = run_load(BalancedClient::new(watcher.clone()), load.clone());
    load.advance(20, Duration::from_secs(20)).await;

    orch.shutdown().await;
    eventually(
        "the watcher to notice the outage",
        Duration::from_secs(45),
        || async { (watcher.state() == WatchState::Stale).then_some(()) },
    )
    .await;
    assert_eq!(
        watcher.instances().len(),
        2,
        "the cache outlives the outage"
    );
    load.advance(50, Duration::from_secs(20)).await;

    let orch = replica(&valkey, &prefix, port, 30).await;
    eventually("the watcher to resync", Duration::from_secs(45), || async {
        (watcher.state() == WatchState::Live).then_some(())
    })
    .await;
    let mut urls: Vec<String> = watcher.instances().into_iter().map(|i| i.url).collect();
    urls.sort();
    let mut expected: Vec<String> = instances.iter().map(|i| i.url.clone()).collect();
    expected.sort();
    assert_eq!(urls, expected);
    load.advance(20, Duration::from_secs(20)).await;
    let (ok, _) = load.finish(task).await;
    println!("outage: {ok} requests, 0 failed");
    orch.shutdown().await;
}

/// A registration through replica A reaches a watcher on replica B, and an expiry reaches
/// the watchers on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_one_replica_reach_watchers_on_both() {
    let valkey = valkey::ValkeyServer::new();
    let prefix = format!("test:{}:", ulid::Ulid::new());
    let a = replica(&valkey, &prefix, 0, 2).await;
    let b = replica(&valkey, &prefix, 0, 2).await;
    let on_a = Watcher::new(a.base_url(), Filter::display_name("svcd")).expect("watcher");
    let on_b = Watcher::new(b.base_url(), Filter::display_name("svcd")).expect("watcher");
    for w in [&on_a, &on_b] {
        tokio::time::timeout(Duration::from_secs(10), w.synced())
            .await
            .expect("synced");
        assert!(w.instances().is_empty());
    }
    let api_a = http::Api::new(a.base_url());
    let url = ReservedPort::new().url();
    api_a.register(&url, "svcd").await;
    for (replica, w) in [("A", &on_a), ("B", &on_b)] {
        eventually(
            &format!("the registration at the watcher on {replica}"),
            Duration::from_secs(10),
            || async { w.instances().iter().any(|i| i.url == url).then_some(()) },
        )
        .await;
    }
    // Never pinged: it expires after 2 s, and both watchers hear of it.
    for (replica, w) in [("A", &on_a), ("B", &on_b)] {
        eventually(
            &format!("the expiry at the watcher on {replica}"),
            Duration::from_secs(15),
            || async { w.instances().is_empty().then_some(()) },
        )
        .await;
        assert_eq!(w.state(), WatchState::Live, "an event, not a reconnect");
    }
    a.shutdown().await;
    b.shutdown().await;
}
