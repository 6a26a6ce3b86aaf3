//! The layer on a tonic server: the same one line, the same lifecycle.

mod support;

use std::time::Duration;

use servicekit::Phase;
use support::*;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const WAIT: Duration = Duration::from_secs(15);

async fn tonic_lifecycle() {
    let (orch, api) = orchestrator(30, None).await;
    let listener = listener().await;
    let port = listener.local_addr().expect("addr").port();
    let layer = builder(&orch.base_url(), port).build().expect("config");
    let handle = layer.handle();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let hook = layer.shutdown_on(async move {
        let _ = stopped.await;
    });
    let server = tokio::spawn(
        Server::builder()
            .layer(layer.clone())
            .add_service(health)
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), hook),
    );

    let url = format!("http://127.0.0.1:{port}");
    let entry = registered(&api, &url, WAIT).await;
    assert_eq!(
        Some(entry["id"].as_str().expect("id").to_owned()),
        handle.wait_registered(WAIT).await.map(|id| id.to_string())
    );

    // The gRPC service itself is untouched by the layer.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("grpc connect");
    let mut client = HealthClient::new(channel);
    let answer = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(answer.status, ServingStatus::Serving as i32);

    let _ = stop.send(());
    tokio::time::timeout(WAIT, server)
        .await
        .expect("server stops")
        .expect("task")
        .expect("serve");
    assert!(
        entries_for(&api, &url).await.is_empty(),
        "deregistered on shutdown"
    );
    assert_eq!(handle.status().phase, Phase::Stopped);
    orch.shutdown().await;
}

#[tokio::test]
async fn tonic_server_registers_and_deregisters_current_thread() {
    tonic_lifecycle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_server_registers_and_deregisters_multi_thread() {
    tonic_lifecycle().await;
}
