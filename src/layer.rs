//! The `tower` layer that makes a service register itself.
//!
//! A layer is the one place every axum and tonic server already accepts, so it is how
//! registration is switched on. The layer itself does nothing per request: `Layer::layer`
//! returns the wrapped service unchanged and only makes sure the lifecycle task runs — once
//! per `RegistrationLayer` value and its clones, however often axum (per route) or tonic (per
//! serve) call it. Deregistration needs to run *before* the server stops accepting, which a
//! layer cannot see, hence [`RegistrationLayer::shutdown_on`] for the server's
//! graceful-shutdown hook.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tower_layer::Layer;

use crate::config::{Config, ConfigError};
use crate::error::RegistrationError;
use crate::handle::RegistrationHandle;
use crate::lifecycle::Lifecycle;

/// Registers the service it is applied to with the orchestrator; see the [crate docs](crate).
///
/// Cheap to clone: clones share one registration.
///
/// ```no_run
/// use axum::{routing::get, Router};
/// use servicekit::RegistrationLayer;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let registration = RegistrationLayer::from_env();
/// let app = Router::new()
///     .route("/", get(|| async { "hello" }))
///     .layer(registration.clone());
/// // Serve on the port the layer advertises.
/// let listener = tokio::net::TcpListener::bind(registration.bind_addr()).await?;
/// axum::serve(listener, app)
///     .with_graceful_shutdown(registration.shutdown_on(servicekit::signal::shutdown_signal()?))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RegistrationLayer {
    lifecycle: Arc<Lifecycle>,
}

impl std::fmt::Debug for RegistrationLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrationLayer")
            .field("config", &self.lifecycle.config())
            .field("phase", &self.lifecycle.phase())
            .finish()
    }
}

impl RegistrationLayer {
    pub(crate) fn from_lifecycle(lifecycle: Lifecycle) -> Self {
        RegistrationLayer {
            lifecycle: Arc::new(lifecycle),
        }
    }

    /// Starts registration for `service` and returns it unchanged: the same as
    /// `Layer::layer`, for applying the layer to a whole service at once. With axum,
    /// `registration.apply(router)` skips the per-route re-boxing that `Router::layer` does
    /// for any layer (see BENCHMARKS.md); the result is the router itself.
    pub fn apply<S>(&self, service: S) -> S {
        self.lifecycle.start();
        service
    }

    /// A handle on the registration's state, e.g. for a readiness endpoint.
    pub fn handle(&self) -> RegistrationHandle {
        RegistrationHandle::new(self.lifecycle.subscribe())
    }

    /// The resolved configuration, or why it could not be resolved.
    pub fn config(&self) -> Result<&Config, &ConfigError> {
        self.lifecycle.config()
    }

    /// The address to serve on so that the server listens where the layer says it does:
    /// `0.0.0.0:<advertised port>`. Bind this (axum) or serve on it (tonic), and the
    /// registered URL and the served port cannot differ. When the configuration could not be
    /// resolved, the port still follows `SERVICEKIT_PORT` (or 8000).
    ///
    /// The other way round works too: bind first, then give the builder
    /// `.port(listener.local_addr()?.port())`.
    pub fn bind_addr(&self) -> SocketAddr {
        self.lifecycle.bind_addr()
    }

    /// The future for the server's graceful-shutdown hook (`with_graceful_shutdown` in axum,
    /// `serve_with_shutdown` in tonic). It completes when the server should stop accepting:
    ///
    /// 1. after `signal` completes, it stops the keepalive, deregisters within
    ///    `shutdown_timeout` (default 2 s; a registration still in flight gets the same
    ///    budget), waits the optional `drain_delay`, and then completes, so the server drains
    ///    only once consumers can no longer find it;
    /// 2. or, with `fail_on_error`, as soon as registration has failed for good; afterwards
    ///    [`error`](Self::error) says why, so `main` can exit non-zero.
    ///
    /// With tonic:
    ///
    /// ```no_run
    /// use servicekit::RegistrationLayer;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let registration = RegistrationLayer::builder().health_path("/").build()?;
    /// let (_reporter, health) = tonic_health::server::health_reporter();
    /// tonic::transport::Server::builder()
    ///     .layer(registration.clone())
    ///     .add_service(health)
    ///     .serve_with_shutdown(
    ///         registration.bind_addr(),
    ///         registration.shutdown_on(servicekit::signal::shutdown_signal()?),
    ///     )
    ///     .await?;
    /// if let Some(e) = registration.error() {
    ///     return Err(e.into());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn shutdown_on<F>(&self, signal: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.lifecycle.clone().shutdown_on(signal)
    }

    /// Sends the service's health to the orchestrator now, with the next ping brought forward,
    /// instead of at the next keepalive interval: call it when the service knows its health
    /// just changed. Does nothing without
    /// [`report_health`](crate::RegistrationLayerBuilder::report_health), before registration,
    /// or while pings are failing (they are backing off). Calls close together make one ping.
    pub fn report_health_now(&self) {
        self.lifecycle.report_health_now();
    }

    /// Why registration failed for good with `fail_on_error` (the reason the shutdown hook
    /// fired on its own), or `None`.
    pub fn error(&self) -> Option<RegistrationError> {
        self.lifecycle.error()
    }

    /// Completes with the error when registration fails for good with `fail_on_error`; never
    /// completes otherwise. For servers without a graceful-shutdown hook:
    ///
    /// ```no_run
    /// # async fn run(serve: impl std::future::Future<Output = ()>) -> Result<(), servicekit::RegistrationError> {
    /// let registration = servicekit::RegistrationLayer::builder().fail_on_error(true).build_lenient();
    /// tokio::select! {
    ///     _ = serve => Ok(()),
    ///     e = registration.failed() => Err(e),
    /// }
    /// # }
    /// ```
    pub fn failed(&self) -> impl Future<Output = RegistrationError> + Send + 'static {
        self.lifecycle.clone().failed()
    }
}

impl<S> Layer<S> for RegistrationLayer {
    type Service = S;

    fn layer(&self, inner: S) -> S {
        self.lifecycle.start();
        inner
    }
}
