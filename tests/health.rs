//! Health end to end: two `service` example processes registered as `svca`, the `consumer`
//! example calling them, and one of them turned unhealthy and healthy again through its admin
//! endpoint (`PUT /admin/health`). Push: the service reports its health on its keepalive pings
//! (TTL 3 s, so a ping every second). Pull: the services report nothing and declare
//! `SERVICEKIT_CHECK_HTTP=/health` every second, which the orchestrator's checker runs. Either
//! way the instance is `critical` within two intervals, leaves `?health=passing` and the
//! consumer's set (which keeps `failed=0`), and comes back when it is healthy again. The
//! examples are built by `scripts/test` before the tests run.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::process::{consumer, consumer_summary, example, Process};
use support::*;

/// The orchestrator's TTL: the layer pings every third of it.
const TTL_SECONDS: u64 = 3;
/// The keepalive interval that follows, and the pull check's interval.
const INTERVAL: Duration = Duration::from_secs(1);
/// What the measurement adds to the two intervals it is held to: the admin `PUT` and the
/// poll of the record every 20 ms, and a probe's round trip on a busy machine. With pull
/// checks and flap damping (two failing results), two intervals is the worst case itself.
const MEASURING: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// The service reports its health on its pings.
    Push,
    /// The orchestrator checks `/health`; the service reports nothing.
    Pull,
}

/// A `service` example process registered as `svca`, with its admin endpoint on.
struct Instance {
    process: Process,
    url: String,
    id: String,
    admin: http::Api,
}

impl Instance {
    async fn start(api: &http::Api, mode: Mode) -> Instance {
        let port = free_port();
        let mut cmd = example("service");
        cmd.env("SERVICEKIT_ORCHESTRATOR_URL", api.base())
            .env("SERVICEKIT_HOST", "127.0.0.1")
            .env("SERVICEKIT_PORT", port.to_string())
            .env("SERVICEKIT_RETRY_DELAY_MS", "100")
            .env("SERVICE_DISPLAY_NAME", "svca")
            .env("SERVICE_ADMIN", "true")
            .env("RUST_LOG", "info");
        if mode == Mode::Pull {
            cmd.env("SERVICE_REPORT_HEALTH", "false")
                .env("SERVICEKIT_CHECK_HTTP", "/health")
                .env(
                    "SERVICEKIT_CHECK_INTERVAL_SECONDS",
                    INTERVAL.as_secs().to_string(),
                );
        }
        let process = Process::spawn(cmd);
        let url = format!("http://127.0.0.1:{port}");
        let record = registered(api, &url, Duration::from_secs(30)).await;
        if mode == Mode::Pull {
            assert_eq!(record["check"]["http"], "/health", "{record}");
        }
        let id = record["id"].as_str().expect("an id").to_owned();
        Instance {
            process,
            admin: http::Api::new(url.clone()),
            url,
            id,
        }
    }

    /// Sets its health through `PUT /admin/health`.
    async fn set_health(&self, status: &str, output: &str) {
        let body = serde_json::to_vec(&json!({"status": status, "output": output})).expect("json");
        let r = self
            .admin
            .send(
                ::http::Method::PUT,
                "/admin/health",
                &[("content-type", "application/json")],
                Some(body),
            )
            .await;
        assert_eq!(r.status, 200, "{r:?}");
    }

    /// The requests its `GET /` has served (from its `/health`, whatever its status).
    async fn served(&self) -> u64 {
        let r = self.admin.get("/health").await;
        let v: Value = r.json();
        v["served"]
            .as_u64()
            .unwrap_or_else(|| panic!("no served in {v}"))
    }
}

/// Waits until the record of `id` has `status`; how long that took from `since`.
async fn status_becomes(api: &http::Api, id: &str, status: &str, since: Instant) -> Duration {
    eventually(
        &format!("{id} to be {status}"),
        Duration::from_secs(30),
        || async {
            let r = api.get(&format!("/services/{id}")).await;
            assert_eq!(r.status, 200, "{r:?}");
            let v: Value = r.json();
            (v["health"]["status"] == status).then(|| since.elapsed())
        },
    )
    .await
}

/// The URLs `GET /services?health=passing` lists.
async fn passing_urls(api: &http::Api) -> Vec<String> {
    let r = api.get("/services?health=passing").await;
    assert_eq!(r.status, 200, "{r:?}");
    let v: Value = r.json();
    v["services"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["url"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until both instances serve the consumer.
async fn both_served(a: &Instance, b: &Instance) {
    let (a0, b0) = (a.served().await, b.served().await);
    eventually("both instances serve", Duration::from_secs(30), || async {
        (a.served().await > a0 && b.served().await > b0).then_some(())
    })
    .await
}

async fn cycle(mode: Mode) {
    let (orch, api) = orchestrator(TTL_SECONDS, None).await;
    let a = Instance::start(&api, mode).await;
    let b = Instance::start(&api, mode).await;
    let consumer = consumer(api.base(), "svca", 50);
    both_served(&a, &b).await;

    // Unhealthy: critical on the record within two intervals.
    let turned = Instant::now();
    a.set_health("critical", "db down").await;
    let took = status_becomes(&api, &a.id, "critical", turned).await;
    println!("{mode:?}: critical on the record {took:?} after the service turned unhealthy");
    assert!(
        took <= 2 * INTERVAL + MEASURING,
        "{mode:?}: critical after {took:?}, more than two intervals ({:?})",
        2 * INTERVAL
    );
    let record: Value = api.get(&format!("/services/{}", a.id)).await.json();
    if mode == Mode::Push {
        assert_eq!(record["health"]["output"], "db down", "{record}");
    }
    let passing = passing_urls(&api).await;
    assert!(
        !passing.contains(&a.url) && passing.contains(&b.url),
        "?health=passing lists {passing:?}"
    );

    // The consumer stops calling it: once its count stands still (requests already on their
    // way when the watch event came may still land), it stays put while b serves 100 more.
    let last = std::cell::Cell::new(a.served().await);
    let stopped = eventually(
        "the consumer to stop calling the critical instance",
        Duration::from_secs(10),
        || async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = a.served().await;
            (now == last.replace(now)).then_some(now)
        },
    )
    .await;
    let b_from = b.served().await;
    eventually(
        "b to serve 100 requests",
        Duration::from_secs(30),
        || async { (b.served().await >= b_from + 100).then_some(()) },
    )
    .await;
    let a_during = a.served().await - stopped;
    println!(
        "{mode:?}: while critical, a served {a_during} requests and b {}",
        b.served().await - b_from
    );
    assert_eq!(
        a_during, 0,
        "{mode:?}: the consumer kept calling the critical instance"
    );

    // Healthy again: passing on the record, listed, and called again.
    let turned = Instant::now();
    a.set_health("passing", "").await;
    let took = status_becomes(&api, &a.id, "passing", turned).await;
    println!("{mode:?}: passing on the record {took:?} after the service recovered");
    assert!(
        took <= 2 * INTERVAL + MEASURING,
        "{mode:?}: passing after {took:?}, more than two intervals"
    );
    assert!(passing_urls(&api).await.contains(&a.url));
    let a_back = a.served().await;
    eventually(
        "the consumer to call the recovered instance",
        Duration::from_secs(10),
        || async { (a.served().await > a_back).then_some(()) },
    )
    .await;
    println!("{mode:?}: the recovered instance gets requests again");

    let (requests, failed, lines) = consumer_summary(consumer).await;
    let failures: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("consumer.request_failed"))
        .collect();
    assert_eq!(failed, 0, "failed requests: {failures:#?}");
    println!("{mode:?}: consumer {requests} requests, {failed} failed");
    for i in [a, b] {
        let (status, lines) = i.process.terminate(Duration::from_secs(20)).await;
        assert!(
            status.success(),
            "{} {status:?}\n{}",
            i.url,
            lines.join("\n")
        );
    }
    orch.shutdown().await;
}

/// Push: the service's own health on its keepalive pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_reporting_critical_leaves_the_consumer_set_and_returns() {
    cycle(Mode::Push).await;
}

/// Pull: the orchestrator checks the service's `/health` (needs the orchestrator's checker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_failing_its_http_check_leaves_the_consumer_set_and_returns() {
    cycle(Mode::Pull).await;
}
