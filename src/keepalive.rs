//! The background task behind the layer: wait for the local server, register, keep the entry
//! alive, re-register when the orchestrator forgot it, and deregister on shutdown.
//!
//! One task owns the whole lifecycle so that its steps can never overlap: a ping can not race
//! the deregistration (which would 404 and trigger a re-registration of a service that is
//! going away), and a re-registration always presents the id of the one before it. The task
//! publishes what it knows through a `watch` channel, which the [`RegistrationHandle`] reads.
//!
//! [`RegistrationHandle`]: crate::RegistrationHandle

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Empty;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use ulid::Ulid;

use crate::client::OrchestratorClient;
use crate::config::Settings;
use crate::handle::{Phase, Status};
use crate::protocol::RegisterResponse;

/// Shortest pause between pings when the orchestrator does not answer.
const MIN_PING_RETRY: Duration = Duration::from_millis(250);

/// What the task reports when it ends for good without being asked to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationError {
    #[error("registration is not configured correctly: {0}")]
    Config(String),
    #[error("the local server never answered on {target} within {waited:?}; is the port ({port}) right?")]
    ServerNotReady {
        target: String,
        port: u16,
        waited: Duration,
    },
    #[error("registration failed after {attempts} attempt(s): {last_error}")]
    Failed { attempts: u32, last_error: String },
    #[error("the orchestrator rejected the registration (a configuration problem): {0}")]
    Rejected(String),
}

/// The full-jitter exponential backoff before attempt `attempt + 1`: a random pause between
/// zero and `base * 2^attempt`, capped at `cap`. A server's `Retry-After` wins when longer.
pub(crate) fn backoff(
    base: Duration,
    attempt: u32,
    cap: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    let cap = cap.min(MAX_PAUSE);
    let ceiling = base
        .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .min(cap);
    let jittered = ceiling.mul_f64(fastrand::f64());
    match retry_after {
        Some(ra) => jittered.max(ra.min(cap)),
        None => jittered,
    }
}

/// Longest pause the task ever takes; also bounds user-given durations in arithmetic.
const MAX_PAUSE: Duration = Duration::from_secs(24 * 3600);
/// Longest TTL taken from an orchestrator's answer (the orchestrator allows one day).
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// `d` ± 10 % (at most [`MAX_PAUSE`]).
fn jitter(d: Duration) -> Duration {
    d.min(MAX_PAUSE).mul_f64(0.9 + 0.2 * fastrand::f64())
}

/// The running registration: what the orchestrator told us.
struct Entry {
    id: Ulid,
    ping_url: String,
    ttl: Duration,
    /// When the entry expires unless pinged, by our clock.
    expires: Instant,
}

impl Entry {
    fn from(answer: RegisterResponse, sent: Instant) -> Entry {
        // The TTL comes from the network: keep it in a range the arithmetic below can take.
        let ttl = Duration::from_secs(answer.ttl_seconds.max(1)).min(MAX_TTL);
        Entry {
            id: answer.id,
            ping_url: answer.ping_url,
            ttl,
            expires: sent + ttl,
        }
    }

    /// The URL of the entry itself, for `DELETE`.
    fn entry_url(&self) -> Option<&str> {
        self.ping_url
            .strip_suffix("/$ping")
            .or_else(|| self.ping_url.strip_suffix("/%24ping"))
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

pub(crate) struct Task {
    pub settings: Settings,
    pub client: OrchestratorClient,
    pub status: watch::Sender<Status>,
    pub stop: watch::Receiver<bool>,
}

impl Task {
    pub(crate) async fn run(mut self) {
        let s = &self.settings;
        tracing::info!(
            orchestrator_url = %s.orchestrator_url,
            service_url = %s.service_url,
            host_source = %s.host_source,
            port_source = %s.port_source,
            max_retries = s.behaviour.max_retries,
            "registration.starting"
        );
        match self.wait_for_server().await {
            Outcome::Done(()) => {}
            Outcome::Stopped => return self.finish(None).await,
            Outcome::Fatal(e) => return self.fail(e),
        }
        self.set_phase(Phase::Registering);
        let mut entry = match self.register_until_done(None).await {
            Outcome::Done(entry) => entry,
            Outcome::Stopped => return self.finish(None).await,
            Outcome::Fatal(e) => return self.fail(e),
        };
        if self.settings.behaviour.enable_keepalive {
            entry = self.keep_alive(entry).await;
        } else {
            self.stopped().await;
        }
        self.finish(Some(entry)).await;
    }

    fn set_phase(&self, phase: Phase) {
        self.status.send_modify(|s| s.phase = phase);
    }

    /// Ends the task because registration failed for good.
    fn fail(&self, e: RegistrationError) {
        tracing::error!(error = %e, fail_on_error = self.settings.behaviour.fail_on_error, "registration.failed");
        let fatal = self.settings.behaviour.fail_on_error;
        self.status.send_modify(|s| s.give_up(fatal, e));
    }

    /// Waits until shutdown is requested.
    async fn stopped(&mut self) {
        let _ = self.stop.wait_for(|stop| *stop).await;
    }

    /// Sleeps for `d` unless shutdown is requested first; `false` when it was.
    async fn pause(&mut self, d: Duration) -> bool {
        Self::unless_stopped(&mut self.stop, tokio::time::sleep(d))
            .await
            .is_some()
    }

    /// Runs `call` unless shutdown is requested first (then it is abandoned: `None`). Used for
    /// readiness probes and pings, which change nothing a deregistration would not undo.
    async fn unless_stopped<T>(
        stop: &mut watch::Receiver<bool>,
        call: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        if *stop.borrow() {
            return None;
        }
        tokio::select! {
            out = call => Some(out),
            _ = stop.wait_for(|stop| *stop) => None,
        }
    }

    async fn wait_for_server(&mut self) -> Outcome<()> {
        let port = self.settings.port;
        let target = match &self.settings.behaviour.health_path {
            Some(path) => format!("http://127.0.0.1:{port}{path}"),
            None => format!("127.0.0.1:{port}"),
        };
        // One client for all probes (it keeps its pool across polls); none for a TCP probe.
        let probe = self
            .settings
            .behaviour
            .health_path
            .is_some()
            .then(|| Client::builder(TokioExecutor::new()).build_http());
        let started = Instant::now();
        let mut poll = Duration::from_millis(20);
        loop {
            let mut stop = self.stop.clone();
            match Self::unless_stopped(&mut stop, answers(&probe, &target)).await {
                None => return Outcome::Stopped,
                Some(true) => {
                    tracing::debug!(target = %target, "registration.server_ready");
                    return Outcome::Done(());
                }
                Some(false) => {}
            }
            let waited = started.elapsed();
            if waited >= self.settings.behaviour.startup_timeout {
                return Outcome::Fatal(RegistrationError::ServerNotReady {
                    target,
                    port,
                    waited: self.settings.behaviour.startup_timeout,
                });
            }
            if !self.pause(poll).await {
                return Outcome::Stopped;
            }
            poll = (poll * 2).min(Duration::from_millis(500));
        }
    }

    /// Registers, retrying with backoff. After `max_retries` failed attempts it gives up when
    /// `fail_on_error` is set, and otherwise keeps trying every `max_retry_delay` (jittered).
    async fn register_until_done(&mut self, previous: Option<Ulid>) -> Outcome<Entry> {
        let max = self.settings.behaviour.max_retries;
        let cap = self.settings.behaviour.max_retry_delay;
        let mut attempt: u32 = 0;
        let mut reported = false;
        loop {
            attempt += 1;
            let sent = Instant::now();
            // Never start a registration after shutdown was requested. One already in flight
            // is let finish (bounded by `timeout`), so that an entry the orchestrator created
            // is deregistered right after instead of lingering for a TTL.
            if *self.stop.borrow() {
                return Outcome::Stopped;
            }
            let result = self
                .client
                .register(&self.settings.service_url, &self.settings.info, previous)
                .await;
            match result {
                Ok(answer) => {
                    let status = if answer.status == crate::protocol::RegistrationStatus::Registered
                    {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    };
                    tracing::info!(
                        service_url = %self.settings.service_url,
                        id = %answer.id,
                        attempt,
                        status_code = status.as_u16(),
                        ttl_seconds = answer.ttl_seconds,
                        "registration.success"
                    );
                    let entry = Entry::from(answer, sent);
                    self.status.send_modify(|s| {
                        s.phase = Phase::Registered;
                        s.id = Some(entry.id);
                        s.last_ping = Some(SystemTime::now());
                        s.error = None;
                    });
                    return Outcome::Done(entry);
                }
                Err(e) if !e.is_retryable() => {
                    return Outcome::Fatal(RegistrationError::Rejected(format!(
                        "{e} (POST {})",
                        self.settings.orchestrator_url
                    )));
                }
                Err(e) => {
                    tracing::warn!(attempt, max_retries = max, error = %e,
                        status_code = e.status().map(|s| s.as_u16()), "registration.attempt_failed");
                    let delay = if attempt < max {
                        backoff(
                            self.settings.behaviour.retry_delay,
                            attempt - 1,
                            cap,
                            e.retry_after(),
                        )
                    } else {
                        if self.settings.behaviour.fail_on_error {
                            return Outcome::Fatal(RegistrationError::Failed {
                                attempts: attempt,
                                last_error: e.to_string(),
                            });
                        }
                        if !reported {
                            reported = true;
                            tracing::error!(attempts = attempt, error = %e,
                                retry_every_ms = cap.as_millis() as u64, "registration.failed");
                            self.status.send_modify(|s| {
                                s.error = Some(RegistrationError::Failed {
                                    attempts: attempt,
                                    last_error: e.to_string(),
                                })
                            });
                        }
                        jitter(cap).max(e.retry_after().unwrap_or_default().min(cap))
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
        }
    }

    /// Pings until shutdown is requested; returns the entry as it stands then.
    async fn keep_alive(&mut self, mut entry: Entry) -> Entry {
        let fixed = self.settings.behaviour.keepalive_interval;
        // At least MIN_PING_RETRY, so the "ping sooner" range below is never empty.
        let interval_of = |e: &Entry| fixed.unwrap_or(e.ttl / 3).clamp(MIN_PING_RETRY, MAX_PAUSE);
        tracing::info!(id = %entry.id, interval_ms = interval_of(&entry).as_millis() as u64,
            "keepalive.started");
        let mut next = jitter(interval_of(&entry));
        let mut failures: u32 = 0;
        loop {
            if !self.pause(next).await {
                break;
            }
            let sent = Instant::now();
            // A ping stuck on a dead connection must not outlive the interval.
            let within = interval_of(&entry);
            let call = self.client.ping(&entry.ping_url, within);
            let mut stop = self.stop.clone();
            let Some(result) = Self::unless_stopped(&mut stop, call).await else {
                break;
            };
            match result {
                Ok(pong) => {
                    failures = 0;
                    entry.expires = sent + entry.ttl;
                    tracing::debug!(id = %pong.id, expires_at = %pong.expires_at, "keepalive.ping_success");
                    self.status.send_modify(|s| {
                        s.last_ping = Some(SystemTime::now());
                        s.phase = Phase::Registered;
                        s.ping_failures = 0;
                        s.error = None;
                    });
                    next = jitter(interval_of(&entry));
                }
                Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => {
                    tracing::warn!(id = %entry.id, "keepalive.service_not_found");
                    if *self.stop.borrow() {
                        break; // going away: do not register again
                    }
                    self.set_phase(Phase::Registering);
                    match self.reregister(entry.id).await {
                        Some(fresh) => {
                            failures = 0;
                            tracing::info!(id = %fresh.id, previous_id = %entry.id,
                                same_id = fresh.id == entry.id, "keepalive.re_registered");
                            entry = fresh;
                            next = jitter(interval_of(&entry));
                        }
                        None if *self.stop.borrow() => break,
                        None => {
                            failures += 1;
                            next = backoff(
                                self.settings.behaviour.retry_delay,
                                failures,
                                self.settings.behaviour.max_retry_delay,
                                None,
                            )
                            .max(MIN_PING_RETRY);
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    let left = entry.expires.saturating_duration_since(Instant::now());
                    let rejected = !e.is_retryable();
                    next = if rejected {
                        // 401/403/...: a configuration problem; pinging faster will not help.
                        jitter(interval_of(&entry))
                    } else if !left.is_zero() {
                        // Ping sooner as expiry nears, so a short outage does not cost the entry.
                        (left / 3).clamp(MIN_PING_RETRY, interval_of(&entry))
                    } else {
                        // Expired by our clock: no reason to hurry any more, but come back
                        // within an interval (the entry must reappear within one once the
                        // orchestrator answers), jittered so a fleet does not retry in step,
                        // and no sooner than a Retry-After asks.
                        // The failed ping's own wait (up to an interval) counts towards it.
                        jitter(interval_of(&entry))
                            .saturating_sub(sent.elapsed())
                            .max(MIN_PING_RETRY)
                            .max(e.retry_after().unwrap_or_default().min(MAX_PAUSE))
                    };
                    let reason = e.to_string();
                    self.status.send_modify(|s| {
                        s.ping_failures = failures;
                        if left.is_zero() {
                            // The orchestrator has dropped the entry by now: not registered.
                            s.phase = Phase::Registering;
                        }
                        if rejected {
                            s.error = Some(RegistrationError::Rejected(reason));
                        }
                    });
                    tracing::warn!(id = %entry.id, error = %e, failures, configuration_problem = rejected,
                        retry_in_ms = next.as_millis() as u64, "keepalive.ping_failed");
                }
            }
        }
        tracing::info!(id = %entry.id, "keepalive.task_stopped");
        entry
    }

    /// One re-registration attempt presenting `previous`; failures are logged.
    async fn reregister(&mut self, previous: Ulid) -> Option<Entry> {
        let sent = Instant::now();
        if *self.stop.borrow() {
            return None;
        }
        // Let an in-flight re-registration finish, as in `register_until_done`.
        let result = self
            .client
            .register(
                &self.settings.service_url,
                &self.settings.info,
                Some(previous),
            )
            .await;
        match result {
            Ok(answer) => {
                let entry = Entry::from(answer, sent);
                self.status.send_modify(|s| {
                    s.phase = Phase::Registered;
                    s.id = Some(entry.id);
                    s.last_ping = Some(SystemTime::now());
                    s.ping_failures = 0;
                    s.error = None;
                });
                Some(entry)
            }
            Err(e) => {
                tracing::warn!(previous_id = %previous, error = %e, "keepalive.re_registration_failed");
                None
            }
        }
    }

    /// Deregisters (when configured and registered) and marks the task stopped.
    async fn finish(&mut self, entry: Option<Entry>) {
        if let (Some(entry), true) = (&entry, self.settings.behaviour.auto_deregister) {
            self.set_phase(Phase::Deregistering);
            match entry.entry_url() {
                None => tracing::warn!(id = %entry.id, ping_url = %entry.ping_url,
                    error = "cannot derive the entry URL from the ping URL", "deregistration.failed"),
                Some(url) => match self.client.deregister(url).await {
                    Ok(existed) => tracing::info!(id = %entry.id, already_gone = !existed,
                        "deregistration.success"),
                    Err(e) => tracing::warn!(id = %entry.id, error = %e, "deregistration.failed"),
                },
            }
        }
        self.status.send_modify(|s| s.phase = Phase::Stopped);
    }
}

/// Whether the local server answers: a 2xx to `GET target` with an HTTP probe client, else
/// an accepted TCP connection to `target`.
async fn answers(probe: &Option<Client<HttpConnector, Empty<Bytes>>>, target: &str) -> bool {
    let bound = Duration::from_secs(1);
    match probe {
        None => matches!(
            tokio::time::timeout(bound, tokio::net::TcpStream::connect(target)).await,
            Ok(Ok(_))
        ),
        Some(client) => {
            let Ok(uri) = target.parse::<http::Uri>() else {
                return false;
            };
            matches!(
                tokio::time::timeout(bound, client.get(uri)).await,
                Ok(Ok(res)) if res.status().is_success()
            )
        }
    }
}

/// Turns a finished-with-error status into the error, for callers that ended the server.
pub(crate) fn error_of(status: &Status) -> Option<RegistrationError> {
    match status.phase {
        Phase::Failed => status.error.clone(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        let base = Duration::from_millis(100);
        for attempt in 0..10 {
            let ceiling = (base * 2u32.pow(attempt)).min(Duration::from_secs(30));
            for _ in 0..50 {
                let d = backoff(base, attempt, Duration::from_secs(30), None);
                assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
            }
        }
        // Full jitter: the pauses are spread out, not all at the ceiling.
        let samples: Vec<_> = (0..200)
            .map(|_| backoff(base, 3, Duration::from_secs(30), None))
            .collect();
        assert!(samples.iter().any(|d| *d < Duration::from_millis(400)));
        assert!(samples.iter().any(|d| *d > Duration::from_millis(400)));
        // Huge attempt counts do not overflow.
        assert!(backoff(base, 400, Duration::from_secs(30), None) <= Duration::from_secs(30));
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap() {
        let d = backoff(
            Duration::from_millis(1),
            0,
            Duration::from_secs(30),
            Some(Duration::from_secs(5)),
        );
        assert!(d >= Duration::from_secs(5));
        let d = backoff(
            Duration::from_millis(1),
            0,
            Duration::from_secs(30),
            Some(Duration::from_secs(500)),
        );
        assert!(d <= Duration::from_secs(30));
    }

    #[test]
    fn keepalive_jitter_stays_within_ten_percent() {
        for _ in 0..200 {
            let d = jitter(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(9) && d <= Duration::from_secs(11),
                "{d:?}"
            );
        }
    }

    #[test]
    fn entry_url_is_the_ping_url_without_ping() {
        let e = Entry {
            id: Ulid::new(),
            ping_url: "http://o:9000/services/01J/$ping".into(),
            ttl: Duration::from_secs(30),
            expires: Instant::now(),
        };
        assert_eq!(e.entry_url(), Some("http://o:9000/services/01J"));
    }
}
