//! The registration lifecycle as one object: it owns the background task, the state it
//! reports, and the shutdown sequence.
//!
//! [`RegistrationLayer`](crate::RegistrationLayer) and its clones share one `Lifecycle`. It
//! starts the task once, however often the layer is applied; the shutdown hook asks it to
//! stop and waits, within a budget, for the deregistration; and when registration fails for
//! good with `fail_on_error`, it says so through the hook, [`error`](Lifecycle::error) and
//! [`failed`](Lifecycle::failed). It never ends the process: that is `main`'s decision.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::OrchestratorClient;
use crate::config::{self, Config, ConfigError};
use crate::error::{ErrorChain, RegistrationError};
use crate::handle::{Phase, Status, StatusWriter};
use crate::probe::Probe;
use crate::task::Task;

/// How long after a fatal failure someone may still start listening (the shutdown hook is
/// wired after the layer is applied) before the failure is reported as unheard.
const LISTEN_GRACE: Duration = Duration::from_secs(10);
/// How much longer than the shutdown budget the hook waits for a stuck task.
const STUCK_MARGIN: Duration = Duration::from_millis(250);

pub(crate) struct Lifecycle {
    config: Result<Config, ConfigError>,
    /// The port to serve on: the advertised one, or the default when the configuration
    /// could not be resolved.
    port: u16,
    started: AtomicBool,
    /// Whether a shutdown hook or a [`failed`](Self::failed) future listens for failure.
    listened: AtomicBool,
    stop: watch::Sender<Option<Instant>>,
    status: StatusWriter,
    /// Wakes the keepalive to report health now.
    health_now: std::sync::Arc<tokio::sync::Notify>,
}

impl Lifecycle {
    pub(crate) fn new(config: Result<Config, ConfigError>, port: u16, fail_on_error: bool) -> Self {
        let (stop, _) = watch::channel(None);
        Lifecycle {
            config,
            port,
            started: AtomicBool::new(false),
            listened: AtomicBool::new(false),
            stop,
            status: StatusWriter::new(fail_on_error),
            health_now: Default::default(),
        }
    }

    pub(crate) fn config(&self) -> Result<&Config, &ConfigError> {
        self.config.as_ref()
    }

    pub(crate) fn bind_addr(&self) -> SocketAddr {
        config::bind_addr(self.port)
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    pub(crate) fn phase(&self) -> Phase {
        self.status.snapshot().phase
    }

    /// Starts the task, once. Needs a tokio runtime; without one it logs and tries again on
    /// the next call.
    pub(crate) fn start(self: &std::sync::Arc<Self>) {
        if self.started.load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("registration.deferred: RegistrationLayer was applied outside a tokio runtime; registration starts when it is applied inside one");
            return;
        };
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let config = match &self.config {
            Ok(c) => c.clone(),
            Err(e) => {
                let fatal = self.status.fail_on_error();
                if matches!(e, ConfigError::MissingOrchestratorUrl { .. }) && !fatal {
                    tracing::warn!(reason = %e, "registration.skipped");
                } else {
                    tracing::error!(error = %e, fail_on_error = fatal, "registration.failed");
                }
                self.status.give_up(RegistrationError::Config(e.clone()));
                let this = self.clone();
                runtime.spawn(async move { this.report_if_unheard().await });
                return;
            }
        };
        let t = &config.tunables;
        let task = Task {
            orchestrator: OrchestratorClient::new(
                config.orchestrator_url.clone(),
                config.registration_key.as_ref(),
                t.timeout,
            )
            .with_check(config.check.clone()),
            probe: Probe::new(config.port, t.health_path.as_deref()),
            config,
            status: self.status.clone(),
            stop: self.stop.subscribe(),
            health_now: self.health_now.clone(),
        };
        self.status.waiting_for_server();
        let this = self.clone();
        runtime.spawn(async move {
            // A panic in the task must not leave the state claiming it still runs (the hook
            // would wait for a deregistration that never comes).
            if let Err(e) = tokio::spawn(task.run()).await {
                let e = RegistrationError::Internal(e.to_string());
                tracing::error!(error = %e, "registration.failed");
                this.status.give_up(e);
            }
            this.report_if_unheard().await;
        });
    }

    /// The shutdown hook's body: completes on `signal` after deregistering (within the
    /// shutdown budget) and the drain delay, or at once when registration failed for good with
    /// `fail_on_error`.
    pub(crate) async fn shutdown_on<F>(self: std::sync::Arc<Self>, signal: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.listened.store(true, Ordering::SeqCst);
        // The hook runs on the server's runtime: if the layer could not start the task
        // (applied outside a runtime, or not applied at all), start it here.
        self.start();
        let mut status = self.subscribe();
        tokio::select! {
            _ = signal => {}
            _ = status.wait_for(|s| s.phase == Phase::Failed) => return,
        }
        // Stored even before the task subscribed. Only the first request counts: a second hook
        // on the same layer (an HTTP and a gRPC server, say) must not extend the budget.
        self.stop.send_if_modified(|at| {
            let first = at.is_none();
            if first {
                *at = Some(Instant::now());
            }
            first
        });
        let Ok(config) = &self.config else {
            return;
        };
        let budget = config.tunables.shutdown_timeout + STUCK_MARGIN;
        let done = status.wait_for(|s| {
            matches!(
                s.phase,
                Phase::Stopped | Phase::Failed | Phase::Unregistered
            )
        });
        if tokio::time::timeout(budget, done).await.is_err() {
            tracing::warn!(
                waited_ms = budget.as_millis() as u64,
                "deregistration.failed"
            );
        }
        let drain = config.tunables.drain_delay;
        if !drain.is_zero() {
            tokio::time::sleep(drain).await;
        }
    }

    /// Asks the keepalive to ping with a fresh health report now.
    pub(crate) fn report_health_now(&self) {
        self.health_now.notify_one();
    }

    /// Why registration failed for good with `fail_on_error`, or `None`.
    pub(crate) fn error(&self) -> Option<RegistrationError> {
        let s = self.status.snapshot();
        (s.phase == Phase::Failed).then_some(s.error).flatten()
    }

    /// Completes with the error once registration failed for good with `fail_on_error`.
    pub(crate) fn failed(
        self: std::sync::Arc<Self>,
    ) -> impl Future<Output = RegistrationError> + Send + 'static {
        self.listened.store(true, Ordering::SeqCst);
        async move {
            let mut status = self.subscribe();
            let failed = status
                .wait_for(|s| s.phase == Phase::Failed && s.error.is_some())
                .await
                .ok()
                .and_then(|s| s.error.clone());
            match failed {
                Some(e) => e,
                // The lifecycle holds the sender: while `self` lives it cannot close.
                None => std::future::pending().await,
            }
        }
    }

    /// With `fail_on_error`, the promise is that the service does not run unregistered. A
    /// library does not end the process; when nothing listens for the failure, say loudly
    /// that the service now runs unregistered, and how to wire it.
    async fn report_if_unheard(&self) {
        if self.error().is_none() {
            return;
        }
        tokio::time::sleep(LISTEN_GRACE).await;
        if let (false, Some(e)) = (self.listened.load(Ordering::SeqCst), self.error()) {
            tracing::error!(error = %ErrorChain(&e),
                "registration.failed: fail_on_error is set but no shutdown hook (RegistrationLayer::shutdown_on) or RegistrationLayer::failed() listens; the service keeps running unregistered");
        }
    }
}
