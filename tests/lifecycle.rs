//! The registration lifecycle against the real orchestrator, over real sockets:
//! start → register → keepalive → (re-register) → signal → deregister → drain → exit.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use serde_json::Value;
use servicekit::error::ErrorChain;
use servicekit::{Phase, RegistrationError, RegistrationLayer};
use support::*;
use tokio::sync::Notify;

const WAIT: Duration = Duration::from_secs(15);

fn app() -> Router {
    Router::new().route("/", get(|| async { "hello" }))
}

async fn registration_appears_once_the_service_listens_body() {
    let (orch, api) = orchestrator(30, None).await;
    // Reserve a port but do not listen yet.
    let reserved = ReservedPort::new();
    let port = reserved.port;
    let layer = builder(&orch.base_url(), port).build().expect("config");
    let handle = layer.handle();
    let app = app().layer(layer.clone());
    handle
        .wait_for(WAIT, |s| s.phase == Phase::WaitingForServer)
        .await
        .expect("task waits for the server");
    let url = format!("http://127.0.0.1:{port}");
    assert!(
        entries_for(&api, &url).await.is_empty(),
        "registered before listening"
    );

    let served = serve(reserved.listen(), app, &layer);
    let entry = registered(&api, &url, WAIT).await;
    let id = handle
        .wait_registered(WAIT)
        .await
        .expect("handle shows registration");
    assert_eq!(entry["id"], id.to_string());
    assert_eq!(entry["info"]["display_name"], "test-service");
    assert!(handle.last_ping().is_some());
    served.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test]
async fn registration_appears_once_the_service_listens_current_thread() {
    registration_appears_once_the_service_listens_body().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_appears_once_the_service_listens_multi_thread() {
    registration_appears_once_the_service_listens_body().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_keeps_the_entry_alive_past_the_ttl() {
    let (orch, api) = orchestrator(2, None).await;
    let (layer, served, url) = serve_app(&orch.base_url(), |b| b).await;
    let handle = layer.handle();
    let first = registered(&api, &url, WAIT).await;
    // Watch for 2.5 TTLs: the entry must be there every time we look, with the same id and
    // a moving last_ping_at. (A TTL of 2 s lets three pings in a row be late before the
    // entry could expire, so a loaded machine does not fail this test.)
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let mut pings = std::collections::BTreeSet::new();
    while std::time::Instant::now() < until {
        let entries = entries_for(&api, &url).await;
        assert_eq!(
            entries.len(),
            1,
            "entry vanished while the service was alive"
        );
        assert_eq!(entries[0]["id"], first["id"]);
        pings.insert(entries[0]["last_ping_at"].as_str().unwrap().to_owned());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(pings.len() >= 4, "pings every ttl/3: saw {pings:?}");
    assert!(handle.is_registered());
    served.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_entry_is_registered_again_with_the_same_id() {
    let (orch, api) = orchestrator(3, None).await;
    let (_layer, served, url) = serve_app(&orch.base_url(), |b| b).await;
    let first = registered(&api, &url, WAIT).await;
    let id = first["id"].as_str().unwrap().to_owned();

    // The layer holds a lease: a stranger cannot delete its entry, the admin can.
    let entry = format!("/services/{id}");
    let r = api.delete(&entry).await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = api
        .send(
            axum::http::Method::DELETE,
            &entry,
            &[("x-admin-key", support::ADMIN_KEY)],
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    // Within one keepalive interval (1 s) plus a little: the next ping's 404 re-registers.
    let again = eventually("re-registration", Duration::from_secs(5), || async {
        entries_for(&api, &url).await.into_iter().next()
    })
    .await;
    assert_eq!(again["id"], id.as_str(), "the instance keeps its identity");
    assert_ne!(again["registered_at"], first["registered_at"]);
    served.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_deregisters_while_a_slow_request_still_runs() {
    let (orch, api) = orchestrator(30, None).await;
    let listener = listener().await;
    let port = listener.local_addr().unwrap().port();
    let layer = builder(&orch.base_url(), port).build().expect("config");
    let handle = layer.handle();
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let app = {
        let (entered, release) = (entered.clone(), release.clone());
        Router::new()
            .route(
                "/slow",
                get(move || {
                    let (entered, release) = (entered.clone(), release.clone());
                    async move {
                        entered.notify_one();
                        release.notified().await;
                        "done"
                    }
                }),
            )
            .layer(layer.clone())
    };
    let mut served = serve(listener, app, &layer);
    let url = format!("http://127.0.0.1:{port}");
    registered(&api, &url, WAIT).await;

    let client = http::Api::new(url.clone());
    let slow = tokio::spawn(async move { client.get("/slow").await });
    tokio::time::timeout(WAIT, entered.notified())
        .await
        .expect("slow request running");

    served.signal();
    // The entry disappears while the request is still in flight.
    eventually("deregistration", WAIT, || async {
        entries_for(&api, &url).await.is_empty().then_some(())
    })
    .await;
    assert!(
        !slow.is_finished(),
        "the in-flight request must still be running"
    );
    assert!(
        !served.task.is_finished(),
        "the server drains only after deregistration"
    );
    handle
        .wait_for(WAIT, |s| s.phase == Phase::Stopped)
        .await
        .expect("task stopped");

    release.notify_one();
    let reply = slow.await.expect("request task");
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], b"done");
    tokio::time::timeout(WAIT, served.task)
        .await
        .expect("server exits after draining")
        .expect("task")
        .expect("serve");
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_started_before_its_orchestrator_registers_when_it_appears() {
    // Refuses connections until the orchestrator takes the port over.
    let orch_reserved = ReservedPort::new();
    let orch_port = orch_reserved.port;
    let orch_base = orch_reserved.url();
    let listener = listener().await;
    let port = listener.local_addr().unwrap().port();
    let layer = builder(&orch_base, port)
        .max_attempts(2)
        .max_retry_delay(Duration::from_millis(300))
        .build()
        .expect("config");
    let handle = layer.handle();
    let served = serve(listener, app().layer(layer.clone()), &layer);
    // Both attempts fail; without fail_on_error the service keeps serving and retrying.
    let status = handle
        .wait_for(WAIT, |s| {
            matches!(s.error, Some(RegistrationError::Exhausted { .. }))
        })
        .await
        .expect("registration.failed after max_retries");
    assert_eq!(status.phase, Phase::Registering);
    assert!(!served.task.is_finished());

    drop(orch_reserved);
    let (orch, api) =
        orchestrator_on(format!("127.0.0.1:{orch_port}").parse().unwrap(), 30, None).await;
    // Background retries run every max_retry_delay (jittered ±10 %).
    let url = format!("http://127.0.0.1:{port}");
    registered(&api, &url, WAIT).await;
    handle
        .wait_registered(WAIT)
        .await
        .expect("the handle follows the orchestrator");
    served.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_on_error_stops_the_server_with_the_reason() {
    let dead_port = ReservedPort::new();
    let dead = dead_port.url();
    let listener = listener().await;
    let port = listener.local_addr().unwrap().port();
    let layer = builder(&dead, port)
        .max_attempts(3)
        .fail_on_error(true)
        .build()
        .expect("config");
    let served = serve(listener, app().layer(layer.clone()), &layer);
    // The server stops on its own, without the user's signal.
    tokio::time::timeout(WAIT, served.task)
        .await
        .expect("server stopped by the failed registration")
        .expect("task")
        .expect("serve");
    match layer.error() {
        Some(e @ RegistrationError::Exhausted { attempts: 3, .. }) => {
            let text = ErrorChain(&e).to_string();
            assert!(text.contains("cannot reach the orchestrator"), "{text}");
        }
        other => panic!("expected a registration failure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_registrations_are_not_retried() {
    let mut config = servicekit_orchestrator::config::Config::for_tests();
    config.registration_key = Some("right".into());
    let orch = servicekit_orchestrator::server::start(config)
        .await
        .unwrap();
    let listener = listener().await;
    let port = listener.local_addr().unwrap().port();
    let layer = builder(&orch.base_url(), port)
        .registration_key("wrong")
        .fail_on_error(true)
        .build()
        .expect("config");
    let served = serve(listener, app().layer(layer.clone()), &layer);
    tokio::time::timeout(WAIT, served.task)
        .await
        .expect("stopped")
        .unwrap()
        .unwrap();
    match layer.error() {
        Some(e @ RegistrationError::Rejected { .. }) => {
            let why = ErrorChain(&e).to_string();
            assert!(why.contains("401"), "{why}")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registration_key_is_sent() {
    let mut config = servicekit_orchestrator::config::Config::for_tests();
    config.registration_key = Some("k3y".into());
    let orch = servicekit_orchestrator::server::start(config)
        .await
        .unwrap();
    let api = http::Api::new(orch.base_url());
    let (_layer, served, url) = serve_app(&orch.base_url(), |b| b.registration_key("k3y")).await;
    registered(&api, &url, WAIT).await;
    served.shutdown().await;
    // Deregistration carried the key too.
    assert!(entries_for(&api, &url).await.is_empty());
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_layer_calls_make_exactly_one_registration() {
    let (orch, api) = orchestrator(30, None).await;
    let listener = listener().await;
    let port = listener.local_addr().unwrap().port();
    let layer = builder(&orch.base_url(), port).build().expect("config");
    // axum calls Layer::layer once per route; clones share one registration task.
    let mut router = Router::new();
    for i in 0..50 {
        router = router.route(&format!("/r{i}"), get(|| async { "ok" }));
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = CountingLayer(layer.clone(), calls.clone());
    let app = router.layer(counted);
    let served = serve(listener, app, &layer);
    let url = format!("http://127.0.0.1:{port}");
    let entry = registered(&api, &url, WAIT).await;
    // New connections and requests do not register again.
    for i in 0..20 {
        let client = http::Api::new(url.clone());
        assert_eq!(client.get(&format!("/r{i}")).await.status, 200);
    }
    let again = entries_for(&api, &url).await;
    assert!(
        calls.load(Ordering::SeqCst) >= 50,
        "the layer was applied per route"
    );
    assert_eq!(again.len(), 1);
    // A second registration would have moved last_updated away from registered_at.
    assert_eq!(again[0]["last_updated"], entry["registered_at"]);
    assert_eq!(again[0]["registered_at"], entry["registered_at"]);
    served.shutdown().await;
    orch.shutdown().await;
}

/// Counts `Layer::layer` calls while delegating to the registration layer.
#[derive(Clone)]
struct CountingLayer(RegistrationLayer, Arc<AtomicUsize>);

impl<S> tower_layer::Layer<S> for CountingLayer {
    type Service = S;
    fn layer(&self, inner: S) -> S {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.layer(inner)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_path_gates_registration() {
    let (orch, api) = orchestrator(30, None).await;
    let listener = listener().await;
    let port = listener.local_addr().unwrap().port();
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let layer = builder(&orch.base_url(), port)
        .health_path("/health")
        .build()
        .expect("config");
    let handle = layer.handle();
    let app = {
        let ready = ready.clone();
        Router::new()
            .route(
                "/health",
                get(move || {
                    let ready = ready.load(Ordering::SeqCst);
                    async move {
                        if ready {
                            (axum::http::StatusCode::OK, "ok")
                        } else {
                            (axum::http::StatusCode::SERVICE_UNAVAILABLE, "starting")
                        }
                    }
                }),
            )
            .layer(layer.clone())
    };
    let served = serve(listener, app, &layer);
    let url = format!("http://127.0.0.1:{port}");
    // The server accepts connections but is not healthy: no registration yet.
    let probe = http::Api::new(url.clone());
    eventually("health answering 503", WAIT, || async {
        (probe.get("/health").await.status == 503).then_some(())
    })
    .await;
    assert_eq!(handle.status().phase, Phase::WaitingForServer);
    assert!(entries_for(&api, &url).await.is_empty());
    ready.store(true, Ordering::SeqCst);
    registered(&api, &url, WAIT).await;
    served.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_deregister_the_entry_outlives_the_process_until_its_ttl() {
    let (orch, api) = orchestrator(30, None).await;
    let (_layer, served, url) = serve_app(&orch.base_url(), |b| b.auto_deregister(false)).await;
    registered(&api, &url, WAIT).await;
    served.shutdown().await;
    assert_eq!(entries_for(&api, &url).await.len(), 1);
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_orchestrator_url_skips_registration_and_keeps_serving() {
    let layer = RegistrationLayer::builder()
        .orchestrator_url_env(format!("SERVICEKIT_TEST_UNSET_{}", ulid::Ulid::new()))
        .port(1)
        .build_lenient();
    assert!(layer.config().is_err());
    let handle = layer.handle();
    let listener = listener().await;
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = serve(listener, app().layer(layer.clone()), &layer);
    let status = handle
        .wait_for(WAIT, |s| s.phase == Phase::Unregistered)
        .await
        .expect("skipped");
    assert!(
        matches!(status.error, Some(RegistrationError::Config(ref e)) if e.to_string().contains("SERVICEKIT_TEST_UNSET_"))
    );
    assert_eq!(http::Api::new(url).get("/").await.status, 200);
    served.shutdown().await;
    assert!(RegistrationLayer::builder()
        .orchestrator_url_env(format!("SERVICEKIT_TEST_UNSET_{}", ulid::Ulid::new()))
        .build()
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_can_be_disabled() {
    let (orch, api) = orchestrator(1, None).await;
    let (_layer, served, url) = serve_app(&orch.base_url(), |b| b.enable_keepalive(false)).await;
    registered(&api, &url, WAIT).await;
    // Without pings the entry expires after its TTL.
    eventually(
        "expiry without keepalive",
        Duration::from_secs(5),
        || async { entries_for(&api, &url).await.is_empty().then_some(()) },
    )
    .await;
    served.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_info_is_registered_as_given() {
    #[derive(serde::Serialize)]
    struct CustomServiceInfo {
        #[serde(flatten)]
        base: servicekit::ServiceInfo,
        team: String,
        capabilities: Vec<String>,
        priority: u32,
    }
    let info = CustomServiceInfo {
        base: servicekit::ServiceInfo::new("Custom Service"),
        team: "data-science".into(),
        capabilities: vec!["ml-inference".into()],
        priority: 5,
    };
    let (orch, api) = orchestrator(30, None).await;
    let (_layer, served, url) = serve_app(&orch.base_url(), |b| b.info(&info)).await;
    let entry = registered(&api, &url, WAIT).await;
    assert_eq!(entry["info"]["display_name"], "Custom Service");
    assert_eq!(entry["info"]["team"], "data-science");
    assert_eq!(
        entry["info"]["capabilities"],
        serde_json::json!(["ml-inference"])
    );
    assert_eq!(entry["info"]["priority"], 5);
    let by_capability: Value = api
        .get("/services?info.capabilities=ml-inference")
        .await
        .json();
    assert_eq!(by_capability["count"], 1);
    served.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_is_reported() {
    let (orch, api) = orchestrator(30, None).await;
    let reserved = ReservedPort::new(); // nothing will listen here
    let port = reserved.port;
    let layer = builder(&orch.base_url(), port)
        .startup_timeout(Duration::from_millis(300))
        .build()
        .expect("config");
    let handle = layer.handle();
    // Applying the layer starts the task; the app itself is never served.
    let _app: Router = app().layer(layer.clone());
    let status = handle
        .wait_for(WAIT, |s| s.phase == Phase::Unregistered)
        .await
        .expect("gives up");
    match status.error {
        Some(RegistrationError::ServerNotReady { port: p, .. }) => assert_eq!(p, port),
        other => panic!("expected ServerNotReady, got {other:?}"),
    }
    let text = status.error.map(|e| e.to_string()).unwrap_or_default();
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert_eq!(api.get("/services").await.json::<Value>()["count"], 0);
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_restart_that_lost_everything_is_healed() {
    let orch_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (orch, api) = orchestrator_on(orch_addr, 3, None).await;
    let (layer, served, url) = serve_app(&orch.base_url(), |b| {
        b.max_retry_delay(Duration::from_millis(500))
    })
    .await;
    let handle = layer.handle();
    let first = registered(&api, &url, WAIT).await;

    // The orchestrator goes away (pings fail), then comes back on the same address with an
    // empty in-memory store (pings answer 404): the service registers again, under a fresh id
    // (the restart lost the URL's binding to its old one).
    orch.shutdown().await;
    let failing = handle
        .wait_for(WAIT, |s| s.ping_failures >= 2)
        .await
        .expect("pings fail");
    assert_eq!(
        failing.phase,
        Phase::Registered,
        "a failed ping alone does not unregister"
    );
    let (orch, api) = orchestrator_on(orch_addr, 3, None).await;
    let again = registered(&api, &url, WAIT).await;
    assert_ne!(again["id"], first["id"]);
    served.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_registers_a_whole_router_without_wrapping_it() {
    let (orch, api) = orchestrator(30, None).await;
    let listener = listener().await;
    let port = listener.local_addr().unwrap().port();
    let layer = builder(&orch.base_url(), port).build().expect("config");
    let handle = layer.handle();
    assert_eq!(handle.status().phase, Phase::NotStarted);
    let app: Router = layer.apply(app());
    let served = serve(listener, app, &layer);
    let url = format!("http://127.0.0.1:{port}");
    let entry = registered(&api, &url, WAIT).await;
    // The orchestrator lists the entry a moment before the client has read its answer.
    let id = handle
        .wait_registered(WAIT)
        .await
        .expect("the handle follows");
    assert_eq!(entry["id"], id.to_string());
    assert_eq!(http::Api::new(url.clone()).get("/").await.status, 200);
    served.shutdown().await;
    assert!(entries_for(&api, &url).await.is_empty());
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_keeps_accepting_until_deregistration_is_done() {
    let (orch, api) = orchestrator(30, None).await;
    // DELETEs reach the orchestrator 800 ms late: the window in which the service must still
    // be reachable, because consumers may still find it.
    let proxy = DelayProxy::start(
        &orch.base_url(),
        axum::http::Method::DELETE,
        Duration::from_millis(800),
    )
    .await;
    let (_layer, mut served, url) = serve_app(&proxy.base, |b| b).await;
    registered(&api, &url, WAIT).await;

    served.signal();
    let mut served_while_registered = 0;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let still_listed = !entries_for(&api, &url).await.is_empty();
        if !still_listed {
            break;
        }
        // Registered, so it must still accept new connections and answer. A request that
        // races the deregistration may go unanswered; only the check after it can tell
        // whether that was a failure.
        let reply = tokio::time::timeout(Duration::from_secs(2), async {
            let stream = tokio::net::TcpStream::connect(url.trim_start_matches("http://")).await;
            match stream {
                Ok(_) => http::Api::new(url.clone())
                    .try_get("/")
                    .await
                    .ok()
                    .map(|r| r.status),
                Err(_) => None,
            }
        })
        .await
        .ok()
        .flatten();
        let listed_after = !entries_for(&api, &url).await.is_empty();
        if listed_after {
            assert_eq!(
                reply.map(|s| s.as_u16()),
                Some(200),
                "stopped serving while still registered"
            );
            served_while_registered += 1;
        }
        assert!(std::time::Instant::now() < deadline, "never deregistered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        served_while_registered >= 3,
        "looked {served_while_registered} times"
    );
    served.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_keepalive_interval_survives_failed_pings() {
    let orch_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (orch, api) = orchestrator_on(orch_addr, 30, None).await;
    let (layer, served, url) = serve_app(&orch.base_url(), |b| {
        b.keepalive_interval(Duration::from_millis(120))
    })
    .await;
    let handle = layer.handle();
    registered(&api, &url, WAIT).await;
    orch.shutdown().await;
    // Pings fail repeatedly; the task keeps going (it used to panic on the first failure).
    handle
        .wait_for(WAIT, |s| s.ping_failures >= 3)
        .await
        .expect("pings keep failing and being retried");
    let (orch, api) = orchestrator_on(orch_addr, 30, None).await;
    registered(&api, &url, WAIT).await;
    served.shutdown().await;
    assert!(
        entries_for(&api, &url).await.is_empty(),
        "deregistered on shutdown"
    );
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_registration_path_is_a_configuration_error() {
    let (orch, _api) = orchestrator(30, None).await;
    // The reference README's `http://orchestrator:9000/register`: the orchestrator answers 404.
    let (layer, served, _url) = serve_app(&orch.base_url(), |b| {
        b.orchestrator_url(format!("{}/register", orch.base_url()))
            .fail_on_error(true)
    })
    .await;
    tokio::time::timeout(WAIT, served.task)
        .await
        .expect("stopped without retrying")
        .unwrap()
        .unwrap();
    match layer.error() {
        Some(e @ RegistrationError::Rejected { .. }) => {
            let why = ErrorChain(&e).to_string();
            assert!(why.contains("404") && why.contains("/register"), "{why}");
            let right = format!("set SERVICEKIT_ORCHESTRATOR_URL={}", orch.base_url());
            assert!(
                why.contains(&right),
                "the hint says what a right URL looks like: {why}"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_on_bind_addr_serves_the_advertised_port() {
    let (orch, api) = orchestrator(30, None).await;
    let reserved = ReservedPort::new();
    let port = reserved.port;
    drop(reserved);
    let layer = builder(&orch.base_url(), port).build().expect("config");
    let addr = layer.bind_addr();
    assert_eq!(addr.port(), layer.config().expect("config").port);
    assert!(addr.ip().is_unspecified(), "every interface: {addr}");
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let served = serve(listener, app().layer(layer.clone()), &layer);
    let entry = registered(&api, &format!("http://127.0.0.1:{port}"), WAIT).await;
    assert_eq!(entry["url"], format!("http://127.0.0.1:{port}"));
    served.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_completes_without_a_shutdown_hook() {
    let dead = ReservedPort::new();
    let listener = listener().await;
    let port = listener.local_addr().unwrap().port();
    let layer = builder(&dead.url(), port)
        .max_attempts(2)
        .fail_on_error(true)
        .build()
        .expect("config");
    // A server without a graceful-shutdown hook: main selects on failed().
    let app = app().layer(layer.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let error = tokio::time::timeout(WAIT, layer.failed())
        .await
        .expect("failed() completes");
    assert!(
        matches!(error, RegistrationError::Exhausted { attempts: 2, .. }),
        "{error:?}"
    );
    assert!(matches!(
        layer.error(),
        Some(RegistrationError::Exhausted { .. })
    ));
    assert!(!server.is_finished(), "the library ends nothing by itself");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hooks_on_one_layer_deregister_once() {
    let (orch, api) = orchestrator(30, None).await;
    let listener = listener().await;
    let port = listener.local_addr().unwrap().port();
    let layer = builder(&orch.base_url(), port).build().expect("config");
    let url = format!("http://127.0.0.1:{port}");
    let served = serve(listener, app().layer(layer.clone()), &layer);
    registered(&api, &url, WAIT).await;
    // A second server (gRPC next to HTTP, say) hooked to the same layer.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let second = tokio::spawn(layer.shutdown_on(async move {
        let _ = rx.await;
    }));
    served.shutdown().await;
    let _ = tx.send(());
    tokio::time::timeout(WAIT, second)
        .await
        .expect("the second hook completes too")
        .expect("hook task");
    assert!(entries_for(&api, &url).await.is_empty(), "deregistered");
    assert_eq!(layer.handle().status().phase, Phase::Stopped);
    orch.shutdown().await;
}
