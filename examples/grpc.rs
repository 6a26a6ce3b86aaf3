//! A tonic gRPC server that registers itself with the servicekit orchestrator.
//!
//! It serves the standard gRPC health service (`grpc.health.v1.Health`, reporting `SERVING`)
//! and applies `RegistrationLayer` with `Server::layer`, exactly as with axum. gRPC speaks
//! HTTP/2 only, so no `health_path` is set: the layer waits until the port accepts TCP
//! connections, then registers `http://<host>:<port>`.
//!
//! ```text
//! cargo run -p servicekit-orchestrator -- --bind 127.0.0.1:9000 &
//! SERVICEKIT_ORCHESTRATOR_URL='http://127.0.0.1:9000/services/$register' \
//! SERVICEKIT_HOST=127.0.0.1 SERVICEKIT_PORT=50051 \
//!     cargo run --example grpc
//! curl http://127.0.0.1:9000/services
//! grpcurl -plaintext 127.0.0.1:50051 grpc.health.v1.Health/Check   # if installed
//! ```
//!
//! Environment:
//!
//! - `SERVICEKIT_ORCHESTRATOR_URL` — the orchestrator's registration endpoint. Unset: the
//!   server runs unregistered and logs `registration.skipped`.
//! - `SERVICEKIT_HOST` — the host advertised to the orchestrator (default: the hostname).
//! - `SERVICEKIT_PORT` — the port to listen on (on `0.0.0.0`) and to advertise. This example
//!   reads it itself, with its own default of 50051 (the library's default is 8000), and hands
//!   the result to the layer with `.port(..)`; a malformed value is an error (exit status 1).
//! - `SERVICEKIT_REGISTRATION_KEY` — sent as `X-Service-Key` when the orchestrator wants one.
//! - `RUST_LOG` — log filter (default `info`).
//!
//! SIGTERM or Ctrl-C deregisters the server, then drains and exits with status 0.

use std::error::Error;
use std::io::IsTerminal;
use std::process::ExitCode;

use servicekit::config::PORT_ENV;
use servicekit::{RegistrationLayer, ServiceInfo};
use tonic::server::NamedService;
use tonic_health::server::HealthReporter;
use tracing_subscriber::EnvFilter;

const DEFAULT_GRPC_PORT: u16 = 50051;

/// The port from `SERVICEKIT_PORT`, or 50051.
fn port() -> Result<u16, String> {
    match std::env::var(PORT_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(DEFAULT_GRPC_PORT),
        Ok(text) => match text.trim().parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(format!(
                "invalid {PORT_ENV}={text:?}: expected a port from 1 to 65535"
            )),
        },
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{PORT_ENV} is not valid UTF-8")),
    }
}

/// Marks the service `svc` implements as `SERVING` (its type names it; the health server's
/// type is opaque, hence the value).
async fn set_serving<S: NamedService>(reporter: &HealthReporter, _svc: &S) {
    reporter.set_serving::<S>().await;
}

async fn run() -> Result<(), Box<dyn Error>> {
    let port = port()?;

    let mut info = ServiceInfo::new("gRPC Example Service");
    info.version = Some("1.0.0".to_owned());
    info.description = Some("servicekit example service (tonic, gRPC health)".to_owned());
    let registration = RegistrationLayer::builder()
        .info(&info)
        .port(port)
        .build_lenient();
    // Serve exactly where the layer says the service is.
    let addr = registration.bind_addr();

    // The overall status ("") starts as SERVING; mark the health service itself too.
    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_serving(&reporter, &health_service).await;

    tracing::info!(port, "starting the gRPC server on {addr}");
    tonic::transport::Server::builder()
        .layer(registration.clone())
        .add_service(health_service)
        .serve_with_shutdown(
            addr,
            registration.shutdown_on(servicekit::signal::shutdown_signal()?),
        )
        .await
        .map_err(|e| {
            // tonic's error says only "transport error"; the cause is its source.
            let cause = e.source().map(|c| format!(": {c}")).unwrap_or_default();
            format!("gRPC server on {addr}: {e}{cause}")
        })?;

    if let Some(e) = registration.error() {
        return Err(e.into());
    }
    Ok(())
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
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
