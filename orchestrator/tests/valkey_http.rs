//! The orchestrator over a real `valkey-server`: the API end to end, and Valkey outages.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use servicekit::protocol::problem_type as t;
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server::{self, Running};
use support::http::{Api, Reply};
use support::valkey::ValkeyServer;

/// How long a request may take while Valkey is down: the 2 s command bound plus slack for a
/// loaded machine. This checks that requests are bounded, not how fast they are.
const OUTAGE_BOUND: Duration = Duration::from_secs(6);

async fn start(valkey: &ValkeyServer) -> (Running, Api) {
    start_with(valkey, Config::for_tests()).await
}

async fn start_with(valkey: &ValkeyServer, mut config: Config) -> (Running, Api) {
    config.valkey_url = Some(valkey.url());
    config.key_prefix = format!("test:{}:", ulid::Ulid::new());
    let running = server::start(config).await.expect("orchestrator starts");
    assert_eq!(running.store_kind(), "valkey");
    let api = Api::new(running.base_url());
    (running, api)
}

/// Polls `GET path` until it answers `status`, failing after `within`.
async fn wait_for_status(api: &Api, path: &str, status: u16, within: Duration) -> Reply {
    let deadline = Instant::now() + within;
    loop {
        let r = api.get(path).await;
        if r.status == status {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still {} after {within:?}",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_entries_refuse_strangers_on_valkey() {
    let valkey = ValkeyServer::new();
    let (running, api) = start(&valkey).await;
    support::lease::leased_entries_refuse_strangers(&api, None).await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_key_may_do_any_write_on_valkey() {
    let valkey = ValkeyServer::new();
    let mut config = Config::for_tests();
    config.valkey_url = Some(valkey.url());
    config.key_prefix = format!("test:{}:", ulid::Ulid::new());
    config.admin_key = Some("adm1n".into());
    let running = server::start(config).await.expect("orchestrator starts");
    let api = Api::new(running.base_url());
    support::lease::leased_entries_refuse_strangers(&api, Some("adm1n")).await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_round_trip_on_valkey() {
    let valkey = ValkeyServer::new();
    let (running, api) = start(&valkey).await;

    let health: Value = api.get("/health").await.json();
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["checks"]["store"]["kind"], "valkey");

    let r = api
        .post_json(
            "/services/$register",
            &json!({"url": "http://svca:8000/", "info": {"display_name": "A", "team": "data"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.json::<Value>()["id"].as_str().unwrap().to_owned();
    let r = api
        .post_json(
            "/services/$register",
            &json!({"url": "http://svca:8000", "info": {"display_name": "A", "team": "web"}}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json::<Value>()["id"], id.as_str());
    api.register("http://svcb:8000", "B").await;

    assert_eq!(api.put(&format!("/services/{id}/$ping")).await.status, 200);
    let record: Value = api.get(&format!("/services/{id}")).await.json();
    assert_eq!(record["info"]["team"], "web");
    let list: Value = api.get("/services?display_name=A").await.json();
    assert_eq!(list["count"], 1);
    let list: Value = api.get("/services?info.team=web").await.json();
    assert_eq!(list["services"][0]["id"], id.as_str());
    let list: Value = api.get("/services").await.json();
    assert_eq!(list["count"], 2);

    let r = api.delete(&format!("/services/{id}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json::<Value>()["service"]["url"], "http://svca:8000");
    api.put(&format!("/services/{id}/$ping"))
        .await
        .assert_problem(404, t::NOT_FOUND);
    let list: Value = api.get("/services").await.json();
    assert_eq!(list["count"], 1);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_lists_in_pages_and_streams_and_counts_against_the_limit() {
    let valkey = ValkeyServer::new();
    // More than one 500-record part of a streamed listing.
    const N: usize = 620;
    let mut config = Config::for_tests();
    config.max_registrations = N as u64;
    let (running, api) = start_with(&valkey, config).await;
    let mut ids = Vec::with_capacity(N);
    let mut named = Vec::new();
    for i in 0..N {
        let name = if i % 100 == 0 { "H" } else { "S" };
        let answer = api.register(&format!("http://s{i}:8000"), name).await;
        let id = answer["id"].as_str().expect("id").to_owned();
        if name == "H" {
            named.push(id.clone());
        }
        ids.push(id);
    }
    ids.sort();
    named.sort();
    assert_eq!(api.list_streamed("").await, ids);
    assert_eq!(api.walk_pages("", 250).await, ids);
    assert_eq!(api.walk_pages("", 1000).await, ids);
    assert_eq!(api.walk_pages("display_name=H", 2).await, named);
    assert_eq!(api.walk_pages("info.display_name=H", 4).await, named);
    assert_eq!(api.list_streamed("display_name=H").await, named);

    // Full: a new URL is refused, a known one renews.
    api.post_json(
        "/services/$register",
        &json!({"url": "http://new:8000", "info": {"display_name": "N"}}),
    )
    .await
    .assert_problem(507, t::LIMIT_EXCEEDED);
    let r = api
        .post_json(
            "/services/$register",
            &json!({"url": "http://s7:8000", "info": {"display_name": "S"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_outage_gives_bounded_503s_and_recovers_without_restart() {
    let mut valkey = ValkeyServer::new();
    let (running, api) = start(&valkey).await;
    let id = api.register("http://svca:8000", "A").await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    valkey.stop();

    let started = Instant::now();
    let r = api
        .post_json(
            "/services/$register",
            &json!({"url": "http://svcb:8000", "info": {"display_name": "B"}}),
        )
        .await;
    assert!(
        started.elapsed() < OUTAGE_BOUND,
        "register took {:?}",
        started.elapsed()
    );
    let p = r.assert_problem(503, t::STORE_UNAVAILABLE);
    assert_eq!(p["instance"], "/services/$register");
    assert_eq!(r.header("retry-after"), Some("1"));

    for path in ["/services".to_owned(), format!("/services/{id}")] {
        let started = Instant::now();
        let r = api.get(&path).await;
        assert!(
            started.elapsed() < OUTAGE_BOUND,
            "{path} took {:?}",
            started.elapsed()
        );
        r.assert_problem(503, t::STORE_UNAVAILABLE);
    }
    let started = Instant::now();
    api.put(&format!("/services/{id}/$ping"))
        .await
        .assert_problem(503, t::STORE_UNAVAILABLE);
    assert!(started.elapsed() < OUTAGE_BOUND);

    let started = Instant::now();
    let r = api.get("/health").await;
    assert!(
        started.elapsed() < OUTAGE_BOUND,
        "health took {:?}",
        started.elapsed()
    );
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    let health: Value = r.json();
    assert_eq!(health["status"], "unhealthy");
    assert_eq!(health["checks"]["store"]["status"], "unhealthy");
    assert!(health["checks"]["store"]["error"].is_string());

    // Valkey comes back empty; the same orchestrator process serves again.
    valkey.start();
    wait_for_status(&api, "/health", 200, Duration::from_secs(20)).await;
    let r = api
        .post_json(
            "/services/$register",
            &json!({"id": id, "url": "http://svca:8000", "info": {"display_name": "A"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    // Nothing binds the old id to the URL any more (the data is gone), so nothing proves it
    // was this URL's: a fresh one (store/mod.rs docs).
    let fresh = r.json::<Value>()["id"].as_str().expect("id").to_owned();
    assert_ne!(fresh, id, "a new id after Valkey lost its data");
    assert_eq!(api.get(&format!("/services/{fresh}")).await.status, 200);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_started_before_valkey_serves_once_it_appears() {
    let mut valkey = ValkeyServer::new();
    valkey.stop();
    let (running, api) = start(&valkey).await;
    let r = api.get("/health").await;
    assert_eq!(r.status, 503);

    valkey.start();
    wait_for_status(&api, "/health", 200, Duration::from_secs(20)).await;
    let r = api
        .post_json(
            "/services/$register",
            &json!({"url": "http://svca:8000", "info": {"display_name": "A"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    running.shutdown().await;
}
