//! The orchestrator's gRPC health check against a real tonic server speaking the standard
//! `grpc.health.v1` protocol. (Here, not in the orchestrator's own tests: tonic would become
//! one of its dev-dependencies, which the README's first command then compiles.)

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server;
use support::http::Api;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

/// Waits (up to 15 s) until the health of `id` satisfies `ok`; returns it.
async fn health_until(api: &Api, id: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let h = api.get(&format!("/services/{id}")).await.json::<Value>()["health"].clone();
        if ok(&h) {
            return h;
        }
        assert!(Instant::now() < deadline, "{what}: health still {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_check_uses_the_standard_health_service() {
    let orch = server::start(Config::for_tests())
        .await
        .expect("orchestrator starts");
    let api = Api::new(orch.base_url());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("svc.v1.Echo", ServingStatus::Serving)
        .await;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let register = |path: &'static str, name: &'static str| {
        let api = &api;
        async move {
            let body = json!({
                "url": format!("http://127.0.0.1:{port}{path}"),
                "info": {"display_name": "checked"},
                "check": {"grpc": name, "failures_before_critical": 1,
                          "interval_seconds": 1, "timeout_seconds": 1},
            });
            let r = api.post_json("/services/$register", &body).await;
            assert!(r.status.is_success(), "register: {r:?}");
            r.json::<Value>()["id"].as_str().expect("id").to_owned()
        }
    };
    let echo = register("/echo", "svc.v1.Echo").await;
    let unknown = register("/other", "svc.v1.Nope").await;
    let output = |h: &Value| h["output"].as_str().unwrap_or_default().to_owned();
    let h = health_until(&api, &echo, "serving", |h| !output(h).is_empty()).await;
    assert_eq!(
        (h["status"].as_str(), output(&h).as_str()),
        (Some("passing"), "gRPC SERVING")
    );
    let h = health_until(&api, &unknown, "unknown", |h| h["status"] == "critical").await;
    // NOT_FOUND for a service the server does not know.
    assert!(output(&h).starts_with("grpc-status 5"), "{h}");
    reporter
        .set_service_status("svc.v1.Echo", ServingStatus::NotServing)
        .await;
    let h = health_until(&api, &echo, "not serving", |h| h["status"] == "critical").await;
    assert_eq!(output(&h), "gRPC NOT_SERVING");
    server.abort();
    orch.shutdown().await;
}
