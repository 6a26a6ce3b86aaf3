//! The whole system in one process, with no outside services: an orchestrator on its
//! embedded in-memory store, two services (`svca`, `svcb`) that register with it through
//! `RegistrationLayer`, keep their entries alive, and deregister on Ctrl-C, and a consumer
//! that finds "Service A" through the watch feed and calls it through `BalancedClient`.
//!
//! ```sh
//! cargo run -p servicekit-orchestrator --example demo
//! ```
//!
//! It prints the registry once both services are registered and the consumer's first answer,
//! then keeps running so you can look around (the dashboard at <http://localhost:9000/ui>,
//! `curl localhost:9000/services`, or watch changes with
//! `curl -N 'localhost:9000/services?watch=true'`). Ctrl-C (or SIGTERM) stops the
//! consumer (printing how many calls it made and how many failed), shuts the services down
//! gracefully — each deregisters before it drains — prints the now empty registry, and exits.
//!
//! It lives in the orchestrator crate, whose dev-dependencies are only axum and the layer, so
//! the README's first command compiles no benchmark, gRPC or doc-UI crates.
//!
//! Environment: `DEMO_ORCHESTRATOR_BIND` (default `127.0.0.1:9000`), `RUST_LOG` (default `info`).

use std::error::Error;
use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use servicekit::discovery::{BalancedClient, Filter, ServedBy, Watcher};
use servicekit::{RegistrationLayer, ServiceInfo};
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    // Installed before anything starts, so that a Ctrl-C while the demo is starting is not
    // lost (nor kills it half-way): it stops cleanly as soon as it has started.
    let shutdown = servicekit::signal::shutdown_signal()?;

    let mut config = Config::for_tests();
    config.bind = std::env::var("DEMO_ORCHESTRATOR_BIND")
        .unwrap_or_else(|_| "127.0.0.1:9000".into())
        .parse()
        .map_err(|e| format!("DEMO_ORCHESTRATOR_BIND: {e}"))?;
    config.ttl_seconds = 10;
    let orchestrator = server::start(config).await?;
    let base = orchestrator.base_url();
    println!("orchestrator: {base} (in-memory store, TTL 10 s)");
    println!("dashboard: {base}/ui");

    let (stop, stopped) = watch::channel(false);
    let svca = start_service("Service A", &base, stopped.clone()).await?;
    let svcb = start_service("Service B", &base, stopped).await?;
    for (name, service) in [("svca", &svca), ("svcb", &svcb)] {
        let id = service
            .registration
            .handle()
            .wait_registered(Duration::from_secs(30))
            .await
            .ok_or_else(|| format!("{name} did not register within 30 s"))?;
        println!("{name}: {} registered as {id}", service.url);
    }

    println!("registry: {}", get_json(&format!("{base}/services")).await?);

    // A consumer of "Service A": the watcher follows the registry's watch feed, the client
    // balances over whatever instances it knows (here, one).
    let watcher = Watcher::new(&base, Filter::display_name("Service A"))?;
    let client = BalancedClient::new(watcher);
    let first = client.get("/api/v1/info").await?;
    let served_by = first
        .extensions()
        .get::<ServedBy>()
        .map_or_else(|| "?".to_owned(), |s| s.url.clone());
    println!(
        "consumer: Service A answered {} from {served_by}: {}",
        first.status(),
        String::from_utf8_lossy(first.body())
    );
    let (consumer_stop, mut consumer_stopped) = watch::channel(false);
    let consumer = tokio::spawn(async move {
        let (mut requests, mut failed) = (1u64, 0u64);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = consumer_stopped.wait_for(|stop| *stop) => return (requests, failed),
            }
            requests += 1;
            match client.get("/api/v1/info").await {
                Ok(res) if res.status().is_success() => {}
                Ok(res) => {
                    failed += 1;
                    tracing::warn!(status = %res.status(), "consumer.request_failed");
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(error = %e, "consumer.request_failed");
                }
            }
        }
    });
    println!(
        "running; try `curl {base}/services` or `curl -N '{base}/services?watch=true'`. \
         Ctrl-C to stop."
    );

    shutdown.await;
    // The consumer first, so that it does not count the services' shutdown as failures.
    let _ = consumer_stop.send(true);
    let (requests, failed) = consumer.await?;
    println!("consumer: requests={requests} failed={failed}");
    let _ = stop.send(true);
    for service in [svca, svcb] {
        service.task.await??;
    }
    println!(
        "registry after shutdown: {}",
        get_json(&format!("{base}/services")).await?
    );
    orchestrator.shutdown().await;
    Ok(())
}

struct Service {
    url: String,
    registration: RegistrationLayer,
    task: JoinHandle<std::io::Result<()>>,
}

/// An axum service on a free loopback port that registers with the orchestrator at `base`.
async fn start_service(
    name: &str,
    base: &str,
    mut stopped: watch::Receiver<bool>,
) -> Result<Service, Box<dyn Error>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let mut info = ServiceInfo::new(name);
    info.version = Some(env!("CARGO_PKG_VERSION").into());
    let registration = RegistrationLayer::builder()
        .orchestrator_url(format!("{base}/services/$register"))
        .host("127.0.0.1")
        .port(port)
        .info(&info)
        .build()?;
    let app = Router::new()
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "healthy"})) }),
        )
        .route("/api/v1/info", get(move || async move { Json(info) }))
        .layer(registration.clone());
    let hook = registration.shutdown_on(async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    });
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(hook)
            .await
    });
    Ok(Service {
        url: format!("http://127.0.0.1:{port}"),
        registration,
        task,
    })
}

/// GETs a URL and returns the body (the demo's own tiny client).
async fn get_json(url: &str) -> Result<String, Box<dyn Error>> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let res = client.get(url.parse()?).await?;
    let body = res.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}
