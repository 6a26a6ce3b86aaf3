//! Self-registration and service discovery for tower-based Rust services.
//!
//! Add one layer and the service registers itself with the servicekit orchestrator once it
//! accepts connections, keeps its entry alive with pings inside the orchestrator's TTL,
//! registers again (keeping its id) when the orchestrator forgot it, and — with one more line
//! in the server's graceful-shutdown hook — deregisters before it drains.
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use servicekit::RegistrationLayer;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let registration = RegistrationLayer::from_env();
//! let app = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(registration.clone());
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8000").await?;
//! axum::serve(listener, app)
//!     .with_graceful_shutdown(registration.shutdown_on(servicekit::signal::shutdown_signal()?))
//!     .await?;
//! if let Some(e) = registration.error() {
//!     return Err(e.into()); // fail_on_error: registration failed for good
//! }
//! # Ok(()) }
//! ```
//!
//! - [`layer`]: the layer, its builder and the shutdown hook.
//! - [`config`]: options, environment variables and their resolution.
//! - [`keepalive`]: the background lifecycle task.
//! - [`client`]: the orchestrator HTTP client.
//! - [`handle`]: the registration state, for readiness checks.
//! - [`protocol`]: the wire types shared with the orchestrator.
//! - [`signal`]: SIGTERM / Ctrl-C for the shutdown hook.

#[cfg(feature = "layer")]
pub mod client;
#[cfg(feature = "layer")]
pub mod config;
#[cfg(feature = "layer")]
pub mod handle;
#[cfg(feature = "layer")]
pub mod keepalive;
#[cfg(feature = "layer")]
pub mod layer;
pub mod protocol;
#[cfg(feature = "signal")]
pub mod signal;

#[cfg(feature = "layer")]
pub use config::ConfigError;
#[cfg(feature = "layer")]
pub use handle::{Phase, RegistrationHandle, Status};
#[cfg(feature = "layer")]
pub use keepalive::RegistrationError;
#[cfg(feature = "layer")]
pub use layer::{RegistrationLayer, RegistrationLayerBuilder};
pub use protocol::ServiceInfo;
