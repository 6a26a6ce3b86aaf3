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
//! let listener = tokio::net::TcpListener::bind(registration.bind_addr()).await?;
//! axum::serve(listener, app)
//!     .with_graceful_shutdown(registration.shutdown_on(servicekit::signal::shutdown_signal()?))
//!     .await?;
//! if let Some(e) = registration.error() {
//!     return Err(e.into()); // fail_on_error: registration failed for good
//! }
//! # Ok(()) }
//! ```
//!
//! Everything the layer does is logged through [`tracing`] with the reference library's event
//! names (`registration.success`, `keepalive.ping_failed`, ...): install a subscriber at info level
//! at least (`tracing_subscriber::fmt().with_max_level(LevelFilter::INFO).init()`; note that
//! `fmt::init()` with the `env-filter` feature shows only errors unless `RUST_LOG` is set), or a
//! misconfigured service stays silent.
//!
//! - [`RegistrationLayer`]: the layer, the shutdown hook and the state; built by
//!   [`RegistrationLayerBuilder`] into a [`Config`].
//! - [`RegistrationHandle`]: the registration state, for readiness checks.
//! - [`RegistrationError`], [`ConfigError`], [`client::ClientError`]: what can go wrong.
//! - [`client`]: the orchestrator HTTP client.
//! - `discovery` (feature `discovery`): find the instances of a service and call them.
//! - [`protocol`]: the wire types shared with the orchestrator.
//! - [`redact`]: secrets out of printed URLs and text, for both crates.
//! - [`signal`]: SIGTERM / Ctrl-C for the shutdown hook.
//!
//! Cargo features, so a crate compiles only what it uses:
//!
//! | feature | default | what |
//! |---|---|---|
//! | `layer` | yes | the layer, its lifecycle and the orchestrator client (turns on `signal`) |
//! | `signal` | with `layer` | [`signal::shutdown_signal`] |
//! | `tls` | no | `https` orchestrator URLs: rustls on ring, the system's trust roots or `SSL_CERT_FILE` (turns on `layer`); without it an https URL is [`ConfigError::TlsNotEnabled`] |
//! | `discovery` | no | `discovery`: the watch-feed `Watcher`, its `tower::discover` stream and the `BalancedClient` (turns on `layer`) |
//! | `tonic` | no | `discovery::tonic::balance_channel`: a tonic `Channel` over a watcher's instances (turns on `discovery`) |
//! | — | always | [`protocol`], the wire types, and [`redact`] (all the orchestrator needs) |
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "layer")]
mod builder;
#[cfg(feature = "layer")]
pub mod client;
#[cfg(feature = "layer")]
pub mod config;
#[cfg(feature = "discovery")]
pub mod discovery;
#[cfg(feature = "layer")]
pub mod error;
#[cfg(feature = "layer")]
mod handle;
#[cfg(feature = "layer")]
mod layer;
#[cfg(feature = "layer")]
mod lifecycle;
#[cfg(feature = "layer")]
mod probe;
pub mod protocol;
pub mod redact;
#[cfg(feature = "layer")]
mod schedule;
#[cfg(feature = "signal")]
pub mod signal;
#[cfg(feature = "layer")]
mod task;

#[cfg(feature = "layer")]
pub use builder::RegistrationLayerBuilder;
#[cfg(feature = "layer")]
pub use config::{Config, ConfigError};
#[cfg(feature = "layer")]
pub use error::RegistrationError;
#[cfg(feature = "layer")]
pub use handle::{Phase, RegistrationHandle, Status};
#[cfg(feature = "layer")]
pub use layer::RegistrationLayer;
pub use protocol::ServiceInfo;

/// The calling crate's package name and version as a [`ServiceInfo`], resolved at compile
/// time, so the registered `display_name` and `version` are the same however the program is
/// started (`cargo run` or the bare executable).
///
/// ```
/// let info = servicekit::package_info!();
/// assert_eq!(info.display_name, env!("CARGO_PKG_NAME"));
/// assert_eq!(info.version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
/// ```
#[macro_export]
macro_rules! package_info {
    () => {
        $crate::ServiceInfo::new(env!("CARGO_PKG_NAME")).with_version(env!("CARGO_PKG_VERSION"))
    };
}

/// The README's Rust blocks, compiled by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
