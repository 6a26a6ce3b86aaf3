//! The `tower` layer that makes a service register itself.
//!
//! A layer is the one place every axum and tonic server already accepts, so it is how
//! registration is switched on. The layer itself does nothing per request: `Layer::layer`
//! returns the wrapped service unchanged and only makes sure the background registration task
//! runs — once per `RegistrationLayer` value and its clones, no matter how often axum (per
//! route) or tonic (per serve) call it. Deregistration needs to run *before* the server stops
//! accepting, which a layer cannot see, hence [`RegistrationLayer::shutdown_on`] for the
//! server's graceful-shutdown hook.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tower_layer::Layer;

use crate::client::OrchestratorClient;
use crate::config::{self, ConfigError, Options, Settings};
use crate::handle::{Phase, RegistrationHandle, Status};
use crate::keepalive::{self, RegistrationError, Task};

/// Registers the service it is applied to with the orchestrator. See the crate docs.
#[derive(Clone)]
pub struct RegistrationLayer {
    shared: Arc<Shared>,
}

struct Shared {
    settings: Result<Settings, ConfigError>,
    started: AtomicBool,
    hook_wired: AtomicBool,
    /// Kept apart from `settings` so it is known even when they did not resolve.
    fail_on_error: bool,
    stop: watch::Sender<bool>,
    status: watch::Sender<Status>,
}

impl std::fmt::Debug for RegistrationLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.shared.settings;
        f.debug_struct("RegistrationLayer")
            .field("service_url", &s.as_ref().map(|s| s.service_url.as_str()))
            .field("phase", &self.shared.status.borrow().phase)
            .finish()
    }
}

impl RegistrationLayer {
    /// Configuration from the environment (`SERVICEKIT_ORCHESTRATOR_URL`, `SERVICEKIT_HOST`,
    /// `SERVICEKIT_PORT`, `SERVICEKIT_REGISTRATION_KEY`) and the defaults. Never fails: a
    /// configuration problem is logged when registration would start (`registration.skipped`
    /// when no orchestrator URL is set, `registration.failed` otherwise), and with
    /// `fail_on_error` it stops the server like any other registration failure.
    pub fn from_env() -> Self {
        Self::builder().build_lenient()
    }

    /// Like [`from_env`](Self::from_env), but a configuration problem is returned.
    pub fn try_from_env() -> Result<Self, ConfigError> {
        Self::builder().build()
    }

    /// Starts a builder with the reference defaults.
    pub fn builder() -> RegistrationLayerBuilder {
        RegistrationLayerBuilder {
            options: Options::default(),
        }
    }

    /// Starts registration for `service` and returns it unchanged: the same as
    /// `Layer::layer`, for applying the layer to a whole service at once. With axum,
    /// `registration.apply(router)` skips the per-route re-boxing that `Router::layer` does
    /// for any layer (see BENCHMARKS.md); the result is the router itself.
    pub fn apply<S>(&self, service: S) -> S {
        self.start();
        service
    }

    /// A handle on the registration's state, e.g. for a readiness endpoint.
    pub fn handle(&self) -> RegistrationHandle {
        RegistrationHandle::new(self.shared.status.subscribe())
    }

    /// The resolved configuration, or why it could not be resolved.
    pub fn settings(&self) -> Result<&Settings, &ConfigError> {
        self.shared.settings.as_ref()
    }

    /// The future for the server's graceful-shutdown hook (`with_graceful_shutdown` in axum,
    /// `serve_with_shutdown` in tonic). It completes when the server should stop accepting:
    ///
    /// 1. after `signal` completes, it stops the keepalive, deregisters (bounded by the
    ///    configured `timeout`), waits the optional `drain_delay`, and then completes, so the
    ///    server drains only once consumers can no longer find it;
    /// 2. or, with `fail_on_error`, as soon as registration has failed for good; afterwards
    ///    [`error`](Self::error) says why, so `main` can exit non-zero.
    pub fn shutdown_on<F>(&self, signal: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.shared.hook_wired.store(true, Ordering::SeqCst);
        let this = self.clone();
        async move {
            // The hook runs on the server's runtime: if the layer could not start the task
            // (applied outside a runtime, or not applied at all), start it here.
            this.start();
            let shared = this.shared;
            let mut status = shared.status.subscribe();
            tokio::select! {
                _ = signal => {}
                _ = status.wait_for(|s| s.phase == Phase::Failed) => return,
            }
            // `send_replace` stores the value even before the task subscribed, so a task started
            // after the signal sees it too.
            shared.stop.send_replace(true);
            let Ok(settings) = &shared.settings else {
                return;
            };
            // A registration in flight (≤ timeout) finishes, then the deregistration (≤ timeout)
            // runs; this bound only guards against a stuck task.
            let bound = settings.behaviour.timeout * 2 + Duration::from_secs(1);
            let done = status.wait_for(|s| {
                matches!(
                    s.phase,
                    Phase::Stopped | Phase::Failed | Phase::Unregistered
                )
            });
            if tokio::time::timeout(bound, done).await.is_err() {
                tracing::warn!(waited = ?bound, "deregistration.failed");
            }
            if !settings.behaviour.drain_delay.is_zero() {
                tokio::time::sleep(settings.behaviour.drain_delay).await;
            }
        }
    }

    /// Why registration failed for good with `fail_on_error` (the reason the shutdown hook
    /// fired on its own), or `None`.
    pub fn error(&self) -> Option<RegistrationError> {
        keepalive::error_of(&self.shared.status.borrow())
    }

    /// Starts the registration task, once. Needs a tokio runtime; without one it logs and
    /// tries again on the next call.
    fn start(&self) {
        if self.shared.started.load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("registration.deferred: RegistrationLayer was applied outside a tokio runtime; registration starts when it is applied inside one");
            return;
        };
        if self.shared.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let settings = match &self.shared.settings {
            Ok(s) => s.clone(),
            Err(e) => return self.report_config_error(e, &runtime),
        };
        let task = Task {
            client: OrchestratorClient::new(
                settings.orchestrator_url.as_str(),
                settings.registration_key.as_deref(),
                settings.behaviour.timeout,
            ),
            settings,
            status: self.shared.status.clone(),
            stop: self.shared.stop.subscribe(),
        };
        // Set before the task runs, so a shutdown hook that fires at once waits for it.
        self.shared
            .status
            .send_modify(|s| s.phase = Phase::WaitingForServer);
        let shared = self.shared.clone();
        let fatal = self.shared.fail_on_error;
        runtime.spawn(async move {
            // A panic in the task must not leave the state claiming it still runs (the hook
            // would wait for a deregistration that never comes).
            if let Err(e) = tokio::spawn(task.run()).await {
                let why = format!("the registration task ended unexpectedly: {e}");
                tracing::error!(error = %why, "registration.failed");
                shared.status.send_modify(|s| {
                    s.give_up(
                        fatal,
                        RegistrationError::Failed {
                            attempts: 0,
                            last_error: why,
                        },
                    )
                });
            }
            exit_unless_hooked(&shared).await;
        });
    }

    fn report_config_error(&self, e: &ConfigError, runtime: &tokio::runtime::Handle) {
        let fatal = self.shared.fail_on_error;
        if matches!(e, ConfigError::MissingOrchestratorUrl { .. }) && !fatal {
            tracing::warn!(reason = %e, "registration.skipped");
        } else {
            tracing::error!(error = %e, fail_on_error = fatal, "registration.failed");
        }
        let err = RegistrationError::Config(e.to_string());
        self.shared.status.send_modify(|s| s.give_up(fatal, err));
        let shared = self.shared.clone();
        runtime.spawn(async move { exit_unless_hooked(&shared).await });
    }
}

/// How long after a fatal registration failure the shutdown hook may still be wired (the layer
/// is applied before the server starts, and `main` may do other work in between).
const HOOK_GRACE: Duration = Duration::from_secs(10);

/// `fail_on_error` promises that the service does not run unregistered. When registration
/// failed for good and no shutdown hook is wired to stop the server gracefully (given
/// [`HOOK_GRACE`] to be wired), stop the process with status 1.
async fn exit_unless_hooked(shared: &Shared) {
    if keepalive::error_of(&shared.status.borrow()).is_none() {
        return;
    }
    tokio::time::sleep(HOOK_GRACE).await;
    if !shared.hook_wired.load(Ordering::SeqCst) {
        tracing::error!("registration failed with fail_on_error and no shutdown hook (RegistrationLayer::shutdown_on) is wired: exiting with status 1");
        std::process::exit(1);
    }
}

impl<S> Layer<S> for RegistrationLayer {
    type Service = S;

    fn layer(&self, inner: S) -> S {
        self.start();
        inner
    }
}

/// Options for a [`RegistrationLayer`]. The orchestrator URL, host, port and registration key
/// fall back to environment variables; every other option has a default.
#[derive(Debug, Clone)]
pub struct RegistrationLayerBuilder {
    options: Options,
}

impl RegistrationLayerBuilder {
    /// The orchestrator's registration endpoint, e.g.
    /// `http://orchestrator:9000/services/$register`. Default: `$SERVICEKIT_ORCHESTRATOR_URL`.
    pub fn orchestrator_url(mut self, url: impl Into<String>) -> Self {
        self.options.orchestrator_url = Some(url.into());
        self
    }

    /// The host this service is reached at. Default: `$SERVICEKIT_HOST`, else the hostname.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.options.host = Some(host.into());
        self
    }

    /// The port this service listens on and advertises. Default: `$SERVICEKIT_PORT`, else 8000.
    pub fn port(mut self, port: u16) -> Self {
        self.options.port = Some(port);
        self
    }

    /// Reads the orchestrator URL from this variable instead of `SERVICEKIT_ORCHESTRATOR_URL`.
    pub fn orchestrator_url_env(mut self, name: impl Into<String>) -> Self {
        self.options.orchestrator_url_env = name.into();
        self
    }

    /// Reads the host override from this variable instead of `SERVICEKIT_HOST`.
    pub fn host_env(mut self, name: impl Into<String>) -> Self {
        self.options.host_env = name.into();
        self
    }

    /// Reads the port from this variable instead of `SERVICEKIT_PORT`.
    pub fn port_env(mut self, name: impl Into<String>) -> Self {
        self.options.port_env = name.into();
        self
    }

    /// Key sent as `X-Service-Key`. Default: `$SERVICEKIT_REGISTRATION_KEY`.
    pub fn registration_key(mut self, key: impl Into<String>) -> Self {
        self.options.registration_key = Some(key.into());
        self
    }

    /// What the service says about itself: a [`ServiceInfo`](crate::ServiceInfo), or any
    /// `Serialize` struct that flattens one. Default: the Cargo package name and version.
    pub fn info<T: Serialize>(mut self, info: &T) -> Self {
        self.options.info = Some(config::info_from(info));
        self
    }

    /// Registration attempts before giving up (total, not retries). Default 5.
    pub fn max_retries(mut self, attempts: u32) -> Self {
        self.options.behaviour.max_retries = attempts;
        self
    }

    /// Base of the exponential backoff between attempts. Default 2 s.
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.options.behaviour.retry_delay = delay;
        self
    }

    /// Longest pause between attempts, and the interval of the background retries once
    /// `max_retries` attempts have failed without `fail_on_error`. Default 30 s.
    pub fn max_retry_delay(mut self, delay: Duration) -> Self {
        self.options.behaviour.max_retry_delay = delay;
        self
    }

    /// Stop the server when registration fails for good. Default false: keep serving and keep
    /// retrying in the background.
    pub fn fail_on_error(mut self, fail: bool) -> Self {
        self.options.behaviour.fail_on_error = fail;
        self
    }

    /// Bound of every orchestrator call. Default 10 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.options.behaviour.timeout = timeout;
        self
    }

    /// Ping to stay registered. Default true.
    pub fn enable_keepalive(mut self, enable: bool) -> Self {
        self.options.behaviour.enable_keepalive = enable;
        self
    }

    /// Fixed ping interval. Default: a third of the orchestrator's `ttl_seconds`.
    pub fn keepalive_interval(mut self, interval: Duration) -> Self {
        self.options.behaviour.keepalive_interval = Some(interval);
        self
    }

    /// Deregister in the shutdown hook. Default true.
    pub fn auto_deregister(mut self, enable: bool) -> Self {
        self.options.behaviour.auto_deregister = enable;
        self
    }

    /// Path probed with an HTTP/1.1 `GET` on `127.0.0.1:<port>` before registering (2xx =
    /// ready). Default: none, a TCP connection to `127.0.0.1:<port>` suffices (the choice for
    /// gRPC servers). Either way the server must accept connections on loopback.
    pub fn health_path(mut self, path: impl Into<String>) -> Self {
        self.options.behaviour.health_path = Some(path.into());
        self
    }

    /// How long to wait for the local server to answer. Default 60 s.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.options.behaviour.startup_timeout = timeout;
        self
    }

    /// Pause between deregistration and draining, for consumers to notice. Default 0.
    pub fn drain_delay(mut self, delay: Duration) -> Self {
        self.options.behaviour.drain_delay = delay;
        self
    }

    /// Resolves the configuration against the environment.
    pub fn build(self) -> Result<RegistrationLayer, ConfigError> {
        let settings = self.resolve()?;
        Ok(RegistrationLayer::with(
            Ok(settings),
            self.options.behaviour.fail_on_error,
        ))
    }

    /// Builds even when the configuration is wrong; the problem is reported when registration
    /// starts (see [`RegistrationLayer::from_env`]).
    pub fn build_lenient(self) -> RegistrationLayer {
        let fail_on_error = self.options.behaviour.fail_on_error;
        RegistrationLayer::with(self.resolve(), fail_on_error)
    }

    fn resolve(&self) -> Result<Settings, ConfigError> {
        // A value that is not UTF-8 is read lossily, so it fails validation naming its
        // variable instead of silently counting as unset.
        self.options.resolve(
            &|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()),
            &config::machine_hostname,
        )
    }
}

impl RegistrationLayer {
    fn with(settings: Result<Settings, ConfigError>, fail_on_error: bool) -> Self {
        let (stop, _) = watch::channel(false);
        let (status, _) = watch::channel(Status::default());
        RegistrationLayer {
            shared: Arc::new(Shared {
                settings,
                started: AtomicBool::new(false),
                hook_wired: AtomicBool::new(false),
                fail_on_error,
                stop,
                status,
            }),
        }
    }
}
