//! The lifecycle task: wait for the local server, register, keep the entry alive, register
//! again when the orchestrator forgot it, and deregister on shutdown.
//!
//! One task owns all of it so that its steps never overlap: a ping cannot race the
//! deregistration (which would 404 and trigger a re-registration of a service that is going
//! away), and a re-registration always presents the id of the one before. It reports every
//! step through the [`StatusWriter`]; the pauses come from [`crate::schedule`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{StatusCode, Uri};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use ulid::Ulid;

use crate::client::{ClientError, OrchestratorClient, Registered};
use crate::config::Config;
use crate::error::{ErrorChain, RegistrationError};
use crate::handle::StatusWriter;
use crate::probe::Probe;
use crate::protocol::{
    HealthReport, HealthStatus, LeaseToken, PingResponse, RegistrationStatus, ServiceInfo,
};
use crate::schedule::{self, PingOutcome, MAX_TTL, MIN_PING_RETRY};

/// The calls the task makes. [`OrchestratorClient`] in production; a fake in the unit tests,
/// which run on tokio's paused clock. `lease` is the token of the entry's lease, when the
/// orchestrator granted one.
pub(crate) trait Orchestrator: Send + Sync + 'static {
    fn register(
        &self,
        url: &str,
        info: &ServiceInfo,
        previous: Option<Ulid>,
        lease: Option<&LeaseToken>,
    ) -> impl Future<Output = Result<Registered, ClientError>> + Send;
    fn ping(
        &self,
        ping_url: &Uri,
        within: Duration,
        lease: Option<&LeaseToken>,
        report: Option<&HealthReport>,
    ) -> impl Future<Output = Result<Option<PingResponse>, ClientError>> + Send;
    fn deregister(
        &self,
        entry_url: &Uri,
        within: Duration,
        lease: Option<&LeaseToken>,
    ) -> impl Future<Output = Result<bool, ClientError>> + Send;
}

impl Orchestrator for OrchestratorClient {
    async fn register(
        &self,
        url: &str,
        info: &ServiceInfo,
        previous: Option<Ulid>,
        lease: Option<&LeaseToken>,
    ) -> Result<Registered, ClientError> {
        OrchestratorClient::register(self, url, info, previous, lease).await
    }
    async fn ping(
        &self,
        ping_url: &Uri,
        within: Duration,
        lease: Option<&LeaseToken>,
        report: Option<&HealthReport>,
    ) -> Result<Option<PingResponse>, ClientError> {
        OrchestratorClient::ping_reporting(self, ping_url, within, lease, report).await
    }
    async fn deregister(
        &self,
        entry_url: &Uri,
        within: Duration,
        lease: Option<&LeaseToken>,
    ) -> Result<bool, ClientError> {
        OrchestratorClient::deregister(self, entry_url, within, lease).await
    }
}

/// When shutdown was requested (`None`: not yet).
pub(crate) type StopRequest = watch::Receiver<Option<Instant>>;

/// The running registration: what the orchestrator told us.
struct Entry {
    id: Ulid,
    ping_url: Uri,
    entry_url: Uri,
    ttl: Duration,
    /// When the entry expires unless pinged, by our clock.
    expires: Instant,
    /// The lease token the orchestrator granted, presented on every later write; `None` from
    /// an orchestrator without leases (the reference). Its `Debug` is redacted; never logged.
    lease: Option<LeaseToken>,
}

impl Entry {
    fn from(r: Registered, sent: Instant) -> Entry {
        // The TTL comes from the network: keep it in a range the arithmetic can take.
        let ttl = Duration::from_secs(r.answer.ttl_seconds.max(1)).min(MAX_TTL);
        Entry {
            id: r.answer.id,
            ping_url: r.ping_url,
            entry_url: r.entry_url,
            ttl,
            expires: sent + ttl,
            lease: r.answer.lease_token,
        }
    }
}

/// How an attempt to reach a state ended.
enum Outcome<T> {
    Done(T),
    /// Shutdown was requested meanwhile.
    Stopped,
    /// Failed for good.
    Fatal(RegistrationError),
}

pub(crate) struct Task<O> {
    pub config: Config,
    pub orchestrator: O,
    pub probe: Probe,
    pub status: StatusWriter,
    pub stop: StopRequest,
    /// Wakes the keepalive to ping (with a fresh health report) now: the layer's
    /// `report_health_now`.
    pub health_now: Arc<Notify>,
}

impl<O: Orchestrator> Task<O> {
    pub(crate) async fn run(mut self) {
        let c = &self.config;
        tracing::info!(
            orchestrator_url = %c.orchestrator_url,
            service_url = %c.service_url,
            host_source = %c.host_source,
            port_source = %c.port_source,
            max_retries = c.tunables.max_attempts,
            registration_key = c.registration_key.is_some(),
            "registration.starting"
        );
        match self.wait_for_server().await {
            Outcome::Done(()) => {}
            Outcome::Stopped => return self.finish(None).await,
            Outcome::Fatal(e) => return self.fail(e),
        }
        self.status.registering();
        let mut entry = match self.register_until_done().await {
            Outcome::Done(entry) => entry,
            Outcome::Stopped => return self.finish(None).await,
            Outcome::Fatal(e) => return self.fail(e),
        };
        if self.config.tunables.enable_keepalive {
            entry = match self.keep_alive(entry).await {
                Ok(entry) => entry,
                Err((entry, e)) => {
                    tracing::info!(id = %entry.id, "keepalive.task_stopped");
                    return self.fail(e);
                }
            };
        } else {
            let _ = self.stop.wait_for(Option::is_some).await;
        }
        self.finish(Some(entry)).await;
    }

    /// Ends the task because registration failed for good.
    fn fail(&self, e: RegistrationError) {
        tracing::error!(error = %ErrorChain(&e), fail_on_error = self.status.fail_on_error(),
            "registration.failed");
        self.status.give_up(e);
    }

    fn stop_requested(&self) -> bool {
        self.stop.borrow().is_some()
    }

    /// Sleeps for `d` unless shutdown is requested first; `false` when it was.
    async fn pause(&mut self, d: Duration) -> bool {
        unless_stopped(&mut self.stop, tokio::time::sleep(d))
            .await
            .is_some()
    }

    /// Sleeps for `d`, or less when `early` and the service asked to report its health now;
    /// `false` when shutdown was requested first.
    async fn pause_or_health_now(&mut self, d: Duration, early: bool) -> bool {
        let now = self.health_now.clone();
        let wake = async {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = now.notified(), if early => {}
            }
        };
        unless_stopped(&mut self.stop, wake).await.is_some()
    }

    /// The service's health for the next ping (`None` without a health function), bounded
    /// by its timeout and by half the keepalive `interval`. It runs as a task of its own, so
    /// a panic in it is a `critical` report, not the end of the keepalive.
    async fn health_report(&self, interval: Duration) -> Option<HealthReport> {
        let health = self.config.tunables.health.clone()?;
        let bound = self.config.tunables.health_timeout.min(interval / 2);
        // Aborted when this future is dropped too (a shutdown during the call), so a hung
        // function does not outlive the keepalive.
        let mut call = AbortOnDrop(tokio::spawn((health.0)()));
        let report = match tokio::time::timeout(bound, &mut call.0).await {
            Ok(Ok(report)) => report,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "keepalive.health_failed");
                HealthReport::critical("health check panicked")
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = bound.as_millis() as u64,
                    "keepalive.health_timed_out"
                );
                HealthReport::critical("health check timed out")
            }
        };
        Some(report)
    }

    async fn wait_for_server(&mut self) -> Outcome<()> {
        let started = Instant::now();
        let startup_timeout = self.config.tunables.startup_timeout;
        let mut poll = Duration::from_millis(20);
        loop {
            let mut stop = self.stop.clone();
            match unless_stopped(&mut stop, self.probe.answers()).await {
                None => return Outcome::Stopped,
                Some(true) => {
                    tracing::debug!(target = %self.probe.target(), "registration.server_ready");
                    return Outcome::Done(());
                }
                Some(false) => {}
            }
            if started.elapsed() >= startup_timeout {
                return Outcome::Fatal(RegistrationError::ServerNotReady {
                    target: self.probe.target().to_owned(),
                    port: self.config.port,
                    waited: startup_timeout,
                });
            }
            if !self.pause(poll).await {
                return Outcome::Stopped;
            }
            poll = (poll * 2).min(Duration::from_millis(500));
        }
    }

    /// One registration attempt. Never started after shutdown was requested; one already in
    /// flight is let finish within the shutdown budget, so that an entry the orchestrator
    /// created is deregistered right after instead of lingering for a TTL. `None`: stopped.
    async fn register_once(
        &mut self,
        previous: Option<Ulid>,
        lease: Option<&LeaseToken>,
    ) -> Option<Result<Registered, ClientError>> {
        if self.stop_requested() {
            return None;
        }
        let call = self.orchestrator.register(
            &self.config.service_url,
            &self.config.info,
            previous,
            lease,
        );
        let budget = self.config.tunables.shutdown_timeout;
        let mut stop = self.stop.clone();
        tokio::select! {
            result = call => Some(result),
            _ = shutdown_deadline(&mut stop, budget) => None,
        }
    }

    /// Registers, retrying with backoff. After `max_attempts` failed attempts it gives up with
    /// `fail_on_error`, and otherwise keeps trying every `max_retry_delay` (jittered).
    async fn register_until_done(&mut self) -> Outcome<Entry> {
        let t = self.config.tunables.clone();
        let mut attempt: u32 = 0;
        let mut reported = false;
        loop {
            attempt = attempt.saturating_add(1);
            let sent = Instant::now();
            let Some(result) = self.register_once(None, None).await else {
                return Outcome::Stopped;
            };
            // A failure that ends after the signal is part of going away, not a reason to
            // report registration as failed.
            if result.is_err() && self.stop_requested() {
                return Outcome::Stopped;
            }
            let e = match result {
                Ok(registered) => {
                    log_registered(&registered, &self.config.service_url, attempt);
                    let entry = Entry::from(registered, sent);
                    self.status.registered(entry.id);
                    return Outcome::Done(entry);
                }
                // 403: the URL's live entry is leased by someone else, most often this
                // service's previous process (restarted within the TTL, or this process's
                // earlier attempt whose answer was lost). That entry expires within one TTL
                // when nobody pings it, so it is waited out like an outage, not given up on.
                Err(e) if !e.is_retryable() && e.status() != Some(StatusCode::FORBIDDEN) => {
                    return Outcome::Fatal(rejected(e));
                }
                Err(e) => e,
            };
            tracing::warn!(attempt, max_retries = t.max_attempts, error = %ErrorChain(&e),
                status_code = e.status().map(|s| s.as_u16()), "registration.attempt_failed");
            let delay = if attempt < t.max_attempts {
                schedule::backoff(
                    t.retry_delay,
                    attempt - 1,
                    t.max_retry_delay,
                    e.retry_after(),
                    schedule::random(),
                )
            } else {
                let retry_after = e.retry_after();
                let error = RegistrationError::Exhausted {
                    attempts: attempt,
                    last: e,
                };
                if self.status.fail_on_error() {
                    return Outcome::Fatal(error);
                }
                if !reported {
                    reported = true;
                    tracing::error!(attempts = attempt, error = %ErrorChain(&error),
                        retry_every_ms = t.max_retry_delay.as_millis() as u64, "registration.failed");
                    self.status.retrying_in_background(error);
                }
                schedule::jitter(t.max_retry_delay, schedule::random())
                    .max(retry_after.unwrap_or_default().min(t.max_retry_delay))
            };
            tracing::info!(
                attempt = attempt + 1,
                delay_ms = delay.as_millis() as u64,
                "registration.retrying"
            );
            if !self.pause(delay).await {
                return Outcome::Stopped;
            }
        }
    }

    /// Pings until shutdown is requested; returns the entry as it stands then, or the reason
    /// to give up for good (with `fail_on_error`).
    async fn keep_alive(&mut self, mut entry: Entry) -> Result<Entry, (Entry, RegistrationError)> {
        let fixed = self.config.tunables.keepalive_interval;
        let interval_of = |e: &Entry| schedule::keepalive_interval(fixed, e.ttl);
        tracing::info!(id = %entry.id, interval_ms = interval_of(&entry).as_millis() as u64,
            "keepalive.started");
        let reports = self.config.tunables.health.is_some();
        // A service that reports its health says it right after registering: it may not be
        // passing, which the orchestrator assumes until told.
        let mut next = if reports {
            Duration::ZERO
        } else {
            schedule::jitter(interval_of(&entry), schedule::random())
        };
        let mut failures: u32 = 0;
        let mut last_reported: Option<HealthStatus> = None;
        let mut health_took = Duration::ZERO;
        loop {
            // The health function's time is part of the interval (unless backing off), so a
            // slow one does not stretch it; a health change wakes the keepalive early.
            let pause = if failures == 0 {
                next.saturating_sub(health_took)
            } else {
                next
            };
            if !self
                .pause_or_health_now(pause, reports && failures == 0)
                .await
            {
                break;
            }
            let interval = interval_of(&entry);
            let asked = Instant::now();
            // Abandoned, like the ping, when shutdown is requested meanwhile.
            let mut stop = self.stop.clone();
            let Some(report) = unless_stopped(&mut stop, self.health_report(interval)).await else {
                break;
            };
            health_took = asked.elapsed();
            if let Some(r) = &report {
                if last_reported != Some(r.status) {
                    tracing::info!(id = %entry.id, status = %r.status, output = ?r.output,
                        "keepalive.health_changed");
                    last_reported = Some(r.status);
                }
            }
            let sent = Instant::now();
            // A ping stuck on a dead connection must not outlive the interval.
            let call = self.orchestrator.ping(
                &entry.ping_url,
                interval,
                entry.lease.as_ref(),
                report.as_ref(),
            );
            let mut stop = self.stop.clone();
            let Some(result) = unless_stopped(&mut stop, call).await else {
                break;
            };
            match result {
                Ok(pong) => {
                    failures = 0;
                    entry.expires = sent + entry.ttl;
                    let expires_at = pong.map(|p| p.expires_at.to_string());
                    tracing::debug!(id = %entry.id, expires_at, "keepalive.ping_success");
                    self.status.pinged();
                    next = schedule::next_ping(interval, PingOutcome::Alive, schedule::random());
                }
                Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => {
                    tracing::warn!(id = %entry.id, "keepalive.service_not_found");
                    self.status.registering();
                    // Presented in case the URL's entry is still live under this lease; for
                    // an entry that is gone, the orchestrator ignores it.
                    let lease = entry.lease.clone();
                    match self.register_once(Some(entry.id), lease.as_ref()).await {
                        None => break, // going away: do not register again
                        Some(Ok(registered)) => {
                            let fresh = Entry::from(registered, sent);
                            tracing::info!(id = %fresh.id, previous_id = %entry.id,
                                same_id = fresh.id == entry.id, "keepalive.re_registered");
                            self.status.registered(fresh.id);
                            failures = 0;
                            entry = fresh;
                            // The new entry starts passing: say how the service is at once.
                            next = if reports {
                                Duration::ZERO
                            } else {
                                schedule::next_ping(
                                    interval_of(&entry),
                                    PingOutcome::Alive,
                                    schedule::random(),
                                )
                            };
                        }
                        Some(Err(e)) => {
                            tracing::warn!(previous_id = %entry.id, error = %ErrorChain(&e),
                                "keepalive.re_registration_failed");
                            if self.stop_requested() {
                                break;
                            }
                            if !e.is_retryable() {
                                // The same answer the first registration treats as a
                                // configuration problem (a rotated key, say): show it, and
                                // with fail_on_error give up as the first registration would.
                                let error = rejected(e);
                                if self.status.fail_on_error() {
                                    return Err((entry, error));
                                }
                                self.status.retrying_in_background(error);
                            }
                            failures = failures.saturating_add(1);
                            next = schedule::backoff(
                                self.config.tunables.retry_delay,
                                failures,
                                self.config.tunables.max_retry_delay,
                                None,
                                schedule::random(),
                            )
                            .max(MIN_PING_RETRY);
                        }
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let left = entry.expires.saturating_duration_since(Instant::now());
                    let rejected = !e.is_retryable();
                    let outcome = if rejected {
                        PingOutcome::Rejected
                    } else {
                        PingOutcome::Unanswered {
                            left,
                            took: sent.elapsed(),
                            retry_after: e.retry_after(),
                        }
                    };
                    next = schedule::next_ping(interval, outcome, schedule::random());
                    tracing::warn!(id = %entry.id, error = %ErrorChain(&e), failures,
                        configuration_problem = rejected, retry_in_ms = next.as_millis() as u64,
                        "keepalive.ping_failed");
                    let rejected = rejected.then(|| RegistrationError::Rejected {
                        source: e,
                        hint: None,
                    });
                    self.status.ping_failed(failures, left.is_zero(), rejected);
                }
            }
        }
        tracing::info!(id = %entry.id, "keepalive.task_stopped");
        Ok(entry)
    }

    /// Deregisters (when configured and registered) within what is left of the shutdown
    /// budget, and marks the task stopped.
    async fn finish(&mut self, entry: Option<Entry>) {
        if let (Some(entry), true) = (&entry, self.config.tunables.auto_deregister) {
            self.status.deregistering();
            let budget = self.config.tunables.shutdown_timeout;
            let deadline = self.stop.borrow().map(|at| at + budget);
            let left = deadline.map_or(budget, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                tracing::warn!(id = %entry.id, error = "the shutdown budget was spent registering",
                    "deregistration.failed");
            } else {
                match self
                    .orchestrator
                    .deregister(&entry.entry_url, left, entry.lease.as_ref())
                    .await
                {
                    Ok(existed) => tracing::info!(id = %entry.id, already_gone = !existed,
                        "deregistration.success"),
                    Err(e) => tracing::warn!(id = %entry.id, error = %ErrorChain(&e),
                        "deregistration.failed"),
                }
            }
        }
        self.status.stopped();
    }
}

fn log_registered(r: &Registered, service_url: &str, attempt: u32) {
    let status = &r.answer.status;
    if matches!(status, RegistrationStatus::Other(_)) {
        tracing::info!(status = ?status.as_str(), "registration.unknown_status");
    }
    tracing::info!(
        service_url = %service_url,
        id = %r.answer.id,
        attempt,
        status = status.as_str(),
        ttl_seconds = r.answer.ttl_seconds,
        "registration.success"
    );
}

/// A registration the orchestrator refused: a configuration problem, with a hint when the
/// answer suggests one.
fn rejected(e: ClientError) -> RegistrationError {
    let hint = wrong_url_hint(&e);
    RegistrationError::Rejected { source: e, hint }
}

/// For a 404 or 405 on registration: which URL was tried and what a correct one looks like.
fn wrong_url_hint(e: &ClientError) -> Option<String> {
    let ClientError::Status { status, url, .. } = e else {
        return None;
    };
    if !matches!(
        *status,
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
    ) {
        return None;
    }
    let base = url
        .parse::<Uri>()
        .ok()
        .and_then(|u| Some(format!("{}://{}", u.scheme_str()?, u.authority()?)))
        .unwrap_or_else(|| "http://orchestrator:9000".to_owned());
    Some(format!(
        "{url} is not the orchestrator's registration endpoint (a path in \
         SERVICEKIT_ORCHESTRATOR_URL is kept, and /services/$register appended to it); \
         if the orchestrator runs at {base}, set SERVICEKIT_ORCHESTRATOR_URL={base}"
    ))
}

/// Runs `call` unless shutdown is requested first (then it is abandoned: `None`). Used for
/// readiness probes and pings, which change nothing a deregistration would not undo.
async fn unless_stopped<T>(stop: &mut StopRequest, call: impl Future<Output = T>) -> Option<T> {
    if stop.borrow().is_some() {
        return None;
    }
    tokio::select! {
        out = call => Some(out),
        _ = stop.wait_for(Option::is_some) => None,
    }
}

/// Completes once shutdown was requested and `budget` has passed since.
async fn shutdown_deadline(stop: &mut StopRequest, budget: Duration) {
    let at = stop.wait_for(Option::is_some).await.ok().and_then(|at| *at);
    match at {
        Some(at) => tokio::time::sleep_until(at + budget).await,
        // The lifecycle is gone: nobody will ever ask to stop.
        None => std::future::pending().await,
    }
}

/// A task aborted when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests;
