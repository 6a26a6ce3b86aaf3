//! Registering with custom metadata: the reference's `CustomServiceInfo`.
//!
//! Any `Serialize` struct that flattens a [`ServiceInfo`] can be given to
//! `RegistrationLayer::builder().info(..)`; its extra fields (`deployment_env`, `team`,
//! `capabilities`, `priority`) are stored by the orchestrator next to the display name and come
//! back in `GET /services`.
//!
//! ```text
//! cargo run -p servicekit-orchestrator -- --bind 127.0.0.1:9000 &
//! SERVICEKIT_ORCHESTRATOR_URL='http://127.0.0.1:9000/services/$register' \
//! SERVICEKIT_HOST=127.0.0.1 SERVICEKIT_PORT=8000 \
//!     cargo run --example custom_info
//! curl http://127.0.0.1:9000/services
//! ```
//!
//! Endpoints: `GET /health` (`{"status":"healthy"}`) and `GET /api/v1/info` (the custom info).
//!
//! Environment (all read by the library, except `RUST_LOG`):
//!
//! - `SERVICEKIT_ORCHESTRATOR_URL` — the orchestrator's registration endpoint. Unset: the
//!   service runs unregistered and logs `registration.skipped`.
//! - `SERVICEKIT_HOST` — the host advertised to the orchestrator (default: the hostname).
//! - `SERVICEKIT_PORT` — the port to listen on (on `0.0.0.0`) and to advertise (default 8000);
//!   a malformed value is an error (exit status 1).
//! - `SERVICEKIT_REGISTRATION_KEY` — sent as `X-Service-Key` when the orchestrator wants one.
//! - `RUST_LOG` — log filter (default `info`).
//!
//! SIGTERM or Ctrl-C deregisters the service, then drains and exits with status 0.

use std::error::Error;
use std::io::IsTerminal;
use std::process::ExitCode;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use servicekit::{RegistrationLayer, ServiceInfo};
use tracing_subscriber::EnvFilter;

/// The registered info: the standard fields plus this organisation's own.
#[derive(Debug, Clone, Serialize)]
struct CustomServiceInfo {
    #[serde(flatten)]
    base: ServiceInfo,
    deployment_env: String,
    team: String,
    capabilities: Vec<String>,
    priority: u32,
}

async fn run() -> Result<(), Box<dyn Error>> {
    let port = servicekit::config::port_from_env()?;

    let mut base = ServiceInfo::new("Custom Service");
    base.version = Some("1.0.0".to_owned());
    let custom = CustomServiceInfo {
        base,
        deployment_env: "staging".to_owned(),
        team: "data-science".to_owned(),
        capabilities: vec!["ml-inference".to_owned()],
        priority: 5,
    };

    let registration = RegistrationLayer::builder()
        .info(&custom)
        .health_path("/health")
        .build_lenient();

    let app = Router::new()
        .route(
            "/health",
            get(|| async { Json(json!({"status": "healthy"})) }),
        )
        .route(
            "/api/v1/info",
            get(|State(info): State<CustomServiceInfo>| async move { Json(info) }),
        )
        .with_state(custom)
        .layer(registration.clone());

    // Serve exactly where the layer says the service is.
    let addr = registration.bind_addr();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    tracing::info!(port, "listening on {addr}");
    axum::serve(listener, app)
        .with_graceful_shutdown(registration.shutdown_on(servicekit::signal::shutdown_signal()?))
        .await?;

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
