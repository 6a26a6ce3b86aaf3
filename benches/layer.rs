//! What `RegistrationLayer` costs per request: the same axum router (state applied first)
//! driven in-process, and the same tonic service over a real HTTP/2 connection, each with
//! and without the layer — while the layer is really registered and pinging an in-process
//! orchestrator in the background.
//!
//! ```sh
//! cargo bench --bench layer            # full run
//! cargo bench --bench layer -- --test  # smoke: every benchmark once (what CI does)
//! ```
//!
//! Besides criterion's reports it prints `with/without` ratios, measured by interleaving
//! batches of both variants so that drift on a shared machine hits both alike.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use criterion::Criterion;
use servicekit::{RegistrationLayer, ServiceInfo};
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::ServiceExt;

#[derive(Clone)]
struct AppState {
    greeting: &'static str,
}

async fn hello(State(state): State<AppState>) -> &'static str {
    state.greeting
}

fn router() -> Router {
    Router::new()
        .route("/hello", get(hello))
        .with_state(AppState { greeting: "hello" })
}

async fn call_axum(app: Router) {
    let req = axum::http::Request::get("/hello")
        .body(Body::empty())
        .expect("request");
    let res = app.oneshot(req).await.expect("infallible");
    assert!(res.status().is_success());
}

async fn call_tonic(client: &mut HealthClient<Channel>) {
    let answer = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check");
    assert_eq!(answer.into_inner().status, 1);
}

/// A layer registered with `orchestrator` for a server on `port`.
fn layer(orchestrator: &str, port: u16) -> RegistrationLayer {
    RegistrationLayer::builder()
        .orchestrator_url(format!("{orchestrator}/services/$register"))
        .host("127.0.0.1")
        .port(port)
        .info(&ServiceInfo::new("bench"))
        .keepalive_interval(Duration::from_millis(500))
        .build()
        .expect("config")
}

/// Median time per call of `f`, over `batches` batches of `per_batch` calls.
fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` (CI) does not: smoke mode.
    let quick = !std::env::args().any(|a| a == "--bench")
        || std::env::args().any(|a| a == "--test")
        || std::env::var_os("BENCH_QUICK").is_some();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // A real orchestrator, so the layer's background task is registered and pinging.
    let orch = rt.block_on(async {
        let mut config = Config::for_tests();
        config.ttl_seconds = 3;
        server::start(config).await.expect("orchestrator")
    });
    let base = orch.base_url();

    // axum, in-process: no layer; tower's Identity layer (what `Router::layer` costs by
    // itself); the registration layer through `Router::layer`; and through `apply`.
    let (plain, identity, layered, applied, probes) = rt.block_on(async {
        let mut probes = Vec::new();
        let mut registered = Vec::new();
        for _ in 0..2 {
            let probe = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            registered.push(layer(&base, probe.local_addr().expect("addr").port()));
            probes.push(probe);
        }
        let layered = router().layer(registered[0].clone());
        let applied = registered[1].apply(router());
        for registration in &registered {
            registration
                .handle()
                .wait_registered(Duration::from_secs(10))
                .await
                .expect("bench layer registers");
        }
        let identity = router().layer(tower::layer::util::Identity::new());
        (router(), identity, layered, applied, probes)
    });

    // tonic, over HTTP/2 on loopback.
    let (mut tonic_plain, mut tonic_layered) = rt.block_on(async {
        let mut clients = Vec::new();
        for with_layer in [false, true] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let (reporter, health) = tonic_health::server::health_reporter();
            reporter
                .set_service_status("", tonic_health::ServingStatus::Serving)
                .await;
            let incoming = TcpIncoming::from(listener);
            if with_layer {
                let registration = layer(&base, port);
                tokio::spawn(
                    Server::builder()
                        .layer(registration.clone())
                        .add_service(health)
                        .serve_with_incoming(incoming),
                );
                registration
                    .handle()
                    .wait_registered(Duration::from_secs(10))
                    .await
                    .expect("tonic bench layer registers");
            } else {
                tokio::spawn(
                    Server::builder()
                        .add_service(health)
                        .serve_with_incoming(incoming),
                );
            }
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
                    .expect("endpoint")
                    .connect()
                    .await
                    .expect("connect");
            clients.push(HealthClient::new(channel));
        }
        let layered = clients.pop().expect("client");
        let plain = clients.pop().expect("client");
        (plain, layered)
    });

    let mut c = Criterion::default().configure_from_args();
    {
        let mut group = c.benchmark_group("axum");
        group.bench_function("without_layer", |b| {
            b.to_async(&rt).iter(|| call_axum(plain.clone()))
        });
        group.bench_function("identity_layer", |b| {
            b.to_async(&rt).iter(|| call_axum(identity.clone()))
        });
        group.bench_function("with_layer", |b| {
            b.to_async(&rt).iter(|| call_axum(layered.clone()))
        });
        group.bench_function("with_apply", |b| {
            b.to_async(&rt).iter(|| call_axum(applied.clone()))
        });
        group.finish();
    }
    {
        let mut group = c.benchmark_group("tonic");
        let (p, l) = (tonic_plain.clone(), tonic_layered.clone());
        group.bench_function("without_layer", |b| {
            b.to_async(&rt).iter(|| {
                let mut client = p.clone();
                async move { call_tonic(&mut client).await }
            })
        });
        group.bench_function("with_layer", |b| {
            b.to_async(&rt).iter(|| {
                let mut client = l.clone();
                async move { call_tonic(&mut client).await }
            })
        });
        group.finish();
    }

    // Interleaved with/without ratios.
    let (batches, per_batch) = if quick { (4, 50) } else { (60, 5_000) };
    // Each variant against the plain router, in interleaved batches.
    let mut axum_ratios = Vec::new();
    for (name, variant) in [
        ("Router::layer(Identity)", &identity),
        ("Router::layer(RegistrationLayer)", &layered),
        ("RegistrationLayer::apply(router)", &applied),
    ] {
        let (with, without) = rt.block_on(async {
            let (mut with, mut without) = (Vec::new(), Vec::new());
            for round in 0..batches {
                for variant_first in [round % 2 == 0, round % 2 != 0] {
                    let app = if variant_first { variant } else { &plain };
                    let started = Instant::now();
                    for _ in 0..per_batch {
                        call_axum(app.clone()).await;
                    }
                    let per_call = started.elapsed().as_nanos() as f64 / per_batch as f64;
                    if variant_first {
                        with.push(per_call)
                    } else {
                        without.push(per_call)
                    }
                }
            }
            (median(with), median(without))
        });
        axum_ratios.push((name, with, without));
    }
    let tonic_batches = if quick { (4, 20) } else { (40, 1_000) };
    let tonic_ratio = rt.block_on(async {
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for round in 0..tonic_batches.0 {
            for layered_first in [round % 2 == 0, round % 2 != 0] {
                let client = if layered_first {
                    &mut tonic_layered
                } else {
                    &mut tonic_plain
                };
                let started = Instant::now();
                for _ in 0..tonic_batches.1 {
                    call_tonic(client).await;
                }
                let per_call = started.elapsed().as_nanos() as f64 / tonic_batches.1 as f64;
                if layered_first {
                    with.push(per_call)
                } else {
                    without.push(per_call)
                }
            }
        }
        (median(with), median(without))
    });
    for (name, with, without) in &axum_ratios {
        println!(
            "layer overhead, axum in-process, {name}: {with:.0} ns vs {without:.0} ns without, ratio = {:.3}",
            with / without
        );
    }
    println!(
        "layer overhead, tonic over HTTP/2: with {:.1} µs, without {:.1} µs, ratio with/without = {:.3}",
        tonic_ratio.0 / 1000.0,
        tonic_ratio.1 / 1000.0,
        tonic_ratio.0 / tonic_ratio.1
    );
    c.final_summary();
    drop(probes);
    rt.block_on(orch.shutdown());
}
