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

/// A tonic health server on a free port, registered as `name` through the layer, counting the
/// calls it serves.
struct GrpcInstance {
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

async fn grpc_instance(base: &str, name: &str) -> GrpcInstance {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let listener = listener().await;
    let port = listener.local_addr().expect("addr").port();
    let layer = builder(base, port)
        .info(&servicekit::ServiceInfo::new(name))
        .build()
        .expect("config");
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let count = tower::util::MapRequestLayer::new(move |req: ::http::Request<_>| {
        counted.fetch_add(1, Ordering::Relaxed);
        req
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let hook = layer.shutdown_on(async move {
        let _ = stopped.await;
    });
    let server = tokio::spawn(
        Server::builder()
            .layer(layer.clone())
            .layer(count)
            .add_service(health)
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), hook),
    );
    layer
        .handle()
        .wait_registered(WAIT)
        .await
        .expect("registered");
    GrpcInstance {
        calls,
        stop,
        server,
    }
}

/// The tonic adapter over the real orchestrator's watch feed: calls spread over both
/// instances; one shuts down (deregistering first) and every later call goes to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balanced_tonic_channel_follows_the_watch_feed() {
    use servicekit::discovery::{Filter, Watcher};
    use std::sync::atomic::Ordering;

    let (orch, _api) = orchestrator(30, None).await;
    let a = grpc_instance(&orch.base_url(), "grpc-health").await;
    let b = grpc_instance(&orch.base_url(), "grpc-health").await;
    let watcher =
        Watcher::new(orch.base_url(), Filter::display_name("grpc-health")).expect("watcher");
    eventually("both instances at the watcher", WAIT, || async {
        (watcher.instances().len() == 2).then_some(())
    })
    .await;
    let mut client = HealthClient::new(servicekit::discovery::tonic::balance_channel(&watcher));
    let check = HealthCheckRequest {
        service: String::new(),
    };
    for _ in 0..40 {
        let answer = client.check(check.clone()).await.expect("health check");
        assert_eq!(answer.into_inner().status, ServingStatus::Serving as i32);
    }
    let (on_a, on_b) = (
        a.calls.load(Ordering::Relaxed),
        b.calls.load(Ordering::Relaxed),
    );
    assert!(
        on_a > 0 && on_b > 0,
        "both instances served: {on_a} and {on_b}"
    );

    let _ = a.stop.send(());
    tokio::time::timeout(WAIT, a.server)
        .await
        .expect("server stops")
        .expect("task")
        .expect("serve");
    eventually(
        "the stopped instance to leave the watcher",
        WAIT,
        || async { (watcher.instances().len() == 1).then_some(()) },
    )
    .await;
    let before = b.calls.load(Ordering::Relaxed);
    for _ in 0..20 {
        client
            .check(check.clone())
            .await
            .expect("health check after a shutdown");
    }
    assert_eq!(b.calls.load(Ordering::Relaxed), before + 20);
    let _ = b.stop.send(());
    let _ = b.server.await;
    orch.shutdown().await;
}
