//! The servicekit orchestrator: a service registry over HTTP.
//!
//! Services register with `POST /services/$register`, keep their entry alive with
//! `PUT /services/{id}/$ping` inside a TTL, and are discovered with `GET /services`. The
//! registry lives in a [`store`]: Valkey for deployments with several orchestrators, or this
//! process's memory as the zero-setup default.
//!
//! - [`config`]: flags and environment variables.
//! - [`server`]: the accept loop, the tower middleware in front of the API, the index
//!   sweeper and graceful shutdown.
//! - [`connection`]: how one accepted connection is served: deadlines, idle limits, head
//!   limits; [`fd_limit`]: the connection cap against the open-file limit.
//! - [`api`]: routing, validation and JSON answers.
//! - [`problem`]: RFC 9457 errors, also for the middleware's own answers.
//! - [`metrics`]: `GET /metrics` (Prometheus text format).
//! - [`dashboard`]: the live dashboard, `GET /ui`; [`openapi`]: `GET /openapi.json` and
//!   Swagger UI on `GET /docs`; [`assets`]: how their embedded files are served.
//! - [`logsafe`]: untrusted text in log lines.
//! - [`lease`]: lease tokens: minting and hashing.
//! - [`store`]: the storage contract and its two implementations.
//! - [`watch`]: the watch feed (`GET /services?watch=true`, Server-Sent Events).
//! - [`tls`]: serving HTTPS with `--tls-cert`/`--tls-key` (the `tls` feature, on by default).
//! - [`redact`]: the library's secret redaction, re-exported.
//!
//! ```no_run
//! # async fn run() -> Result<(), servicekit_orchestrator::server::StartError> {
//! use servicekit_orchestrator::{config::Config, server};
//! let running = server::start(Config::for_tests()).await?;
//! println!("listening on {}", running.base_url());
//! running.shutdown().await;
//! # Ok(()) }
//! ```

pub mod api;
pub mod assets;
pub mod checks;
pub mod config;
pub mod connection;
pub mod dashboard;
pub mod fd_limit;
pub mod lease;
pub mod logsafe;
pub mod metrics;
pub mod openapi;
pub mod problem;
/// Secret redaction, shared with the library.
pub use servicekit::redact;
pub mod server;
pub mod store;
pub mod tls;
pub mod watch;
