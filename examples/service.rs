//! An axum 0.8 service that registers itself with the servicekit orchestrator: the
//! reference's example service.
//!
//! ```text
//! cargo run -p servicekit-orchestrator -- --bind 127.0.0.1:9000 &
//! SERVICEKIT_ORCHESTRATOR_URL='http://127.0.0.1:9000/services/$register' \
//! SERVICEKIT_HOST=127.0.0.1 SERVICEKIT_PORT=8000 \
//!     cargo run --example service
//! curl http://127.0.0.1:9000/services
//! ```
//!
//! Endpoints:
//!
//! - `GET /` — a small HTML landing page linking the others;
//! - `GET /health` — `{"status":"passing", "output":"", "served":N, "registration": {...}}`:
//!   the service's health (`passing`, `warning` or `critical`) with 200, 429 or 503 (what an
//!   orchestrator pull check reads as passing, warning, critical), the requests `GET /` has
//!   served (to see which instance gets traffic), and the registration state. The same health
//!   goes to the orchestrator on every keepalive ping (`report_health`);
//! - `PUT /admin/health` — only with `SERVICE_ADMIN=true`, for tests and demos: sets the
//!   health, e.g. `{"status":"critical","output":"db down"}` (`output` optional), reports it
//!   to the orchestrator at once and answers the new health; 404 otherwise;
//! - `GET /api/v1/system` — time (RFC 3339), hostname, OS, architecture and versions;
//! - `GET /api/v1/info` — the `ServiceInfo` this service registers with;
//! - `GET /docs/` — Swagger UI (served from the binary, works offline) for
//!   `GET /api-docs/openapi.json`.
//!
//! Environment:
//!
//! - `SERVICEKIT_ORCHESTRATOR_URL` — the orchestrator's registration endpoint. Unset: the
//!   service runs unregistered and logs `registration.skipped`.
//! - `SERVICEKIT_HOST` — the host advertised to the orchestrator (default: the hostname).
//! - `SERVICEKIT_PORT` — the port to listen on (on `0.0.0.0`) and to advertise (default 8000).
//! - `SERVICEKIT_REGISTRATION_KEY` — sent as `X-Service-Key` when the orchestrator wants one.
//! - `SERVICE_DISPLAY_NAME` — the registered display name (default "Registration Example
//!   Service").
//! - `SERVICEKIT_FAIL_ON_ERROR` — `true` (or `1`/`yes`/`on`): stop and exit with status 1 when
//!   registration fails for good, e.g. after `SERVICEKIT_MAX_RETRIES` failed attempts or with no
//!   orchestrator URL (default `false`: keep serving, retrying in the background every 30 s).
//! - `SERVICEKIT_MAX_RETRIES` — registration attempts before giving up (at least 1; default 5).
//! - `SERVICEKIT_RETRY_DELAY_MS` — base of the exponential backoff in ms (default 2000).
//! - `SERVICE_HEALTH` — the health to start with: `passing` (default), `warning` or
//!   `critical`; `SERVICE_HEALTH_OUTPUT` — its output text (default empty).
//! - `SERVICE_REPORT_HEALTH` — `false` (or `0`/`no`/`off`) sends no health on the pings
//!   (default on), e.g. to see a pull check (`SERVICEKIT_CHECK_*`) alone at work.
//! - `SERVICE_ADMIN` — `true` (or `1`/`yes`/`on`) enables `PUT /admin/health` (default off:
//!   anyone who can reach it could take the instance out of rotation).
//! - `SERVICEKIT_CHECK_HTTP=/health` (or `SERVICEKIT_CHECK_TCP=true`), with
//!   `SERVICEKIT_CHECK_INTERVAL_SECONDS`, `SERVICEKIT_CHECK_TIMEOUT_SECONDS` and
//!   `SERVICEKIT_CHECK_DEREGISTER_CRITICAL_AFTER_SECONDS` — ask the orchestrator to check
//!   the service itself (read by the library; see the README's configuration table).
//! - `RUST_LOG` — log filter (default `info`).
//!
//! Before registering, the layer waits until `GET /api/v1/info` answers (not `/health`,
//! which a service started `critical` never passes: it registers and reports `critical`).
//!
//! `SERVICEKIT_FAIL_ON_ERROR`, `SERVICEKIT_MAX_RETRIES`, `SERVICEKIT_RETRY_DELAY_MS` and the
//! `SERVICE_*` variables are read by this example, the other `SERVICEKIT_*` ones by the library (`SERVICEKIT_PORT` by
//! both). A malformed port or knob stops the example at once with status 1; a missing or
//! malformed orchestrator URL, host, key or check is only logged and the service runs unregistered
//! (unless `SERVICEKIT_FAIL_ON_ERROR` is on).
//! SIGTERM or Ctrl-C deregisters the service, then drains and exits with status 0.

use std::error::Error;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Html;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Serialize;
use servicekit::error::ErrorChain;
use servicekit::protocol::{HealthReport, HealthStatus, Timestamp};
use servicekit::{RegistrationHandle, RegistrationLayer, ServiceInfo};
use tracing_subscriber::EnvFilter;
use utoipa::{OpenApi, ToSchema};
use utoipa_swagger_ui::{Config, SwaggerUi};

const DEFAULT_DISPLAY_NAME: &str = "Registration Example Service";
const SERVICE_VERSION: &str = "1.0.0";
const OPENAPI_PATH: &str = "/api-docs/openapi.json";

#[derive(Clone)]
struct AppState {
    info: ServiceInfo,
    registration: RegistrationHandle,
    layer: RegistrationLayer,
    /// What `/health` and the keepalive pings report.
    health: Arc<Mutex<HealthReport>>,
    /// Requests `GET /` has served.
    served: Arc<AtomicU64>,
}

/// The service's own health: one place for `/health` and the pings.
fn current_health(health: &Mutex<HealthReport>) -> HealthReport {
    health.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The service's health, plus where the registration stands.
#[derive(Serialize, ToSchema)]
struct Health {
    /// `passing` (answered with 200), `warning` (429) or `critical` (503).
    #[schema(example = "passing")]
    status: String,
    /// Why, when not passing.
    #[schema(example = "")]
    output: String,
    /// Requests `GET /` has served since the start.
    served: u64,
    registration: RegistrationState,
}

/// A snapshot of the registration with the orchestrator.
#[derive(Serialize, ToSchema)]
struct RegistrationState {
    /// `NotStarted`, `WaitingForServer`, `Registering`, `Registered`, `Unregistered`,
    /// `Failed`, `Deregistering` or `Stopped`.
    #[schema(example = "Registered")]
    phase: String,
    /// Whether the orchestrator currently lists this service.
    registered: bool,
    /// The id the orchestrator assigned (kept across re-registrations).
    #[schema(example = "01K8H2Z3V4W5X6Y7Z8A9B0C1D2")]
    id: Option<String>,
    /// When the last registration or keepalive ping succeeded (RFC 3339).
    last_ping: Option<String>,
    /// The last reason registration failed.
    error: Option<String>,
}

/// Facts about the machine and the build.
#[derive(Serialize, ToSchema)]
struct SystemInfo {
    /// The current time, RFC 3339 UTC.
    #[schema(example = "2025-10-27T12:00:30.000Z")]
    time: String,
    hostname: String,
    /// `std::env::consts::OS`, e.g. `linux`.
    os: &'static str,
    /// `std::env::consts::ARCH`, e.g. `x86_64`.
    arch: &'static str,
    versions: Versions,
}

#[derive(Serialize, ToSchema)]
struct Versions {
    /// This service's version.
    service: &'static str,
    /// The servicekit crate version.
    servicekit: &'static str,
    /// The minimum Rust version servicekit supports (`rust-version`).
    rust_required: &'static str,
}

/// What the service registers with (only the fixed fields; any others are kept as given).
#[derive(Serialize, ToSchema)]
#[schema(as = ServiceInfo)]
#[allow(dead_code)] // documents the schema only
struct ServiceInfoDoc {
    display_name: String,
    version: Option<String>,
    description: Option<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Registration Example Service",
        version = "1.0.0",
        description = "The servicekit example service: an axum service that registers itself with the orchestrator."
    ),
    paths(health, system, service_info),
    components(schemas(Health, RegistrationState, SystemInfo, Versions, ServiceInfoDoc))
)]
struct ApiDoc;

/// Health and registration state.
#[utoipa::path(get, path = "/health", responses(
    (status = 200, description = "passing", body = Health),
    (status = 429, description = "warning", body = Health),
    (status = 503, description = "critical", body = Health),
))]
async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let report = current_health(&state.health);
    let code = match report.status {
        HealthStatus::Passing => StatusCode::OK,
        HealthStatus::Warning => StatusCode::TOO_MANY_REQUESTS,
        HealthStatus::Critical => StatusCode::SERVICE_UNAVAILABLE,
    };
    let status = state.registration.status();
    (
        code,
        Json(Health {
            status: report.status.to_string(),
            output: report.output,
            served: state.served.load(Ordering::Relaxed),
            registration: RegistrationState {
                phase: status.phase.to_string(),
                registered: state.registration.is_registered(),
                id: status.id.map(|id| id.to_string()),
                last_ping: status.last_ping.map(|t| Timestamp::from(t).to_string()),
                error: status.error.map(|e| ErrorChain(&e).to_string()),
            },
        }),
    )
}

/// `PUT /admin/health` (with `SERVICE_ADMIN=true`): sets the health and reports it now.
async fn set_health(
    State(state): State<AppState>,
    Json(report): Json<HealthReport>,
) -> Json<HealthReport> {
    tracing::info!(status = %report.status, output = ?report.output, "service.health_set");
    *state.health.lock().unwrap_or_else(|p| p.into_inner()) = report.clone();
    state.layer.report_health_now();
    Json(report)
}

/// Time, host, OS and versions.
#[utoipa::path(get, path = "/api/v1/system", responses((status = 200, body = SystemInfo)))]
async fn system() -> Json<SystemInfo> {
    Json(SystemInfo {
        time: Timestamp::now().to_string(),
        hostname: gethostname::gethostname().to_string_lossy().into_owned(),
        os: std::env::consts::OS,
        arch: std::env::consts::ARCH,
        versions: Versions {
            service: SERVICE_VERSION,
            servicekit: env!("CARGO_PKG_VERSION"),
            rust_required: env!("CARGO_PKG_RUST_VERSION"),
        },
    })
}

/// The info this service registers with.
#[utoipa::path(get, path = "/api/v1/info", responses((status = 200, body = ServiceInfoDoc)))]
async fn service_info(State(state): State<AppState>) -> Json<ServiceInfo> {
    Json(state.info)
}

async fn landing(State(state): State<AppState>) -> Html<String> {
    state.served.fetch_add(1, Ordering::Relaxed);
    let name = escape_html(&state.info.display_name);
    Html(format!(
        r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{name}</title></head>
<body>
<h1>{name}</h1>
<p>Version {SERVICE_VERSION}; registers itself with the servicekit orchestrator.</p>
<ul>
<li><a href="/health">/health</a> — health and registration state</li>
<li><a href="/api/v1/system">/api/v1/system</a> — system information</li>
<li><a href="/api/v1/info">/api/v1/info</a> — service info</li>
<li><a href="/docs/">/docs/</a> — API documentation (Swagger UI)</li>
</ul>
</body>
</html>
"#
    ))
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Parses the variable `name` when it is set.
fn env_parse<T: FromStr>(name: &str, expected: &str) -> Result<Option<T>, String> {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("invalid {name}={text:?}: expected {expected}")),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
    }
}

fn env_bool(name: &str) -> Result<bool, String> {
    match env_parse::<String>(name, "")?.as_deref() {
        None | Some("") => Ok(false),
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(format!("invalid {name}={v:?}: expected true or false")),
        },
    }
}

async fn run() -> Result<(), Box<dyn Error>> {
    let port = servicekit::config::port_from_env()?;
    let fail_on_error = env_bool("SERVICEKIT_FAIL_ON_ERROR")?;
    let max_retries = env_parse::<u32>("SERVICEKIT_MAX_RETRIES", "a number of attempts >= 1")?;
    if max_retries == Some(0) {
        return Err(
            "invalid SERVICEKIT_MAX_RETRIES=\"0\": expected a number of attempts >= 1".into(),
        );
    }
    let retry_delay = env_parse::<u64>("SERVICEKIT_RETRY_DELAY_MS", "milliseconds")?;
    let admin = env_bool("SERVICE_ADMIN")?;
    let push = match std::env::var("SERVICE_REPORT_HEALTH") {
        Ok(v) if !v.trim().is_empty() => env_bool("SERVICE_REPORT_HEALTH")?,
        _ => true,
    };
    let initial = env_parse::<HealthStatus>("SERVICE_HEALTH", "passing, warning or critical")?
        .unwrap_or(HealthStatus::Passing);
    let output = env_parse::<String>("SERVICE_HEALTH_OUTPUT", "text")?.unwrap_or_default();
    let own_health = Arc::new(Mutex::new(HealthReport::new(initial, output)));

    let mut info = ServiceInfo::new(
        std::env::var("SERVICE_DISPLAY_NAME")
            .ok()
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_DISPLAY_NAME.to_owned()),
    );
    info.version = Some(SERVICE_VERSION.to_owned());
    info.description = Some("servicekit example service (axum)".to_owned());

    let mut builder = RegistrationLayer::builder()
        .info(&info)
        // Ready once it serves; /health may be critical on purpose (SERVICE_HEALTH).
        .health_path("/api/v1/info")
        .fail_on_error(fail_on_error);
    if push {
        let reported = own_health.clone();
        builder = builder.report_health(move || {
            let report = current_health(&reported);
            async move { report }
        });
    }
    if let Some(attempts) = max_retries {
        builder = builder.max_attempts(attempts);
    }
    if let Some(ms) = retry_delay {
        builder = builder.retry_delay(Duration::from_millis(ms));
    }
    // Lenient: a missing or wrong registration setting is logged when registration starts
    // instead of keeping the service from starting (unless fail_on_error).
    let registration = builder.build_lenient();

    let state = AppState {
        info,
        registration: registration.handle(),
        layer: registration.clone(),
        health: own_health,
        served: Arc::default(),
    };
    let mut app = Router::new()
        .route("/", get(landing))
        .route("/health", get(health))
        .route("/api/v1/system", get(system))
        .route("/api/v1/info", get(service_info));
    if admin {
        app = app.route("/admin/health", put(set_health));
    }
    let app = app
        .with_state(state)
        .merge(
            SwaggerUi::new("/docs")
                .url(OPENAPI_PATH, ApiDoc::openapi())
                // No badge from validator.swagger.io: the page needs nothing from the network.
                .config(Config::new([OPENAPI_PATH]).validator_url("none")),
        )
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
    tracing::info!("stopped");
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
