//! A cheap, cloneable view of the registration for the application itself, e.g. a readiness
//! endpoint that answers 503 until the service is registered.
//!
//! Every change of the state goes through [`StatusWriter`], whose methods are the lifecycle's
//! transitions; handles only read.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use ulid::Ulid;

use crate::error::RegistrationError;

/// Where the registration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Phase {
    /// The layer has not been applied inside a tokio runtime yet.
    #[default]
    NotStarted,
    /// Waiting for the local server to answer on its port.
    WaitingForServer,
    /// Registering (first time, or again after the orchestrator forgot the entry). After
    /// `max_attempts` failed attempts without `fail_on_error`, it stays here with
    /// [`Status::error`] set while retrying in the background.
    Registering,
    /// Registered and, with keepalive, pinging.
    Registered,
    /// Gave up for good without `fail_on_error` (configuration problem, rejected
    /// registration, server never answered): the service runs unregistered (see the error).
    Unregistered,
    /// Gave up with `fail_on_error`: the shutdown hook has fired (see the error).
    Failed,
    /// Shutdown requested: deregistering.
    Deregistering,
    /// Done: deregistered (or never registered) after shutdown.
    Stopped,
}

impl Phase {
    /// The phase in snake_case, e.g. `"waiting_for_server"`, for readiness endpoints and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::NotStarted => "not_started",
            Phase::WaitingForServer => "waiting_for_server",
            Phase::Registering => "registering",
            Phase::Registered => "registered",
            Phase::Unregistered => "unregistered",
            Phase::Failed => "failed",
            Phase::Deregistering => "deregistering",
            Phase::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Phase {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A snapshot of the registration.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Status {
    /// Where the registration stands.
    pub phase: Phase,
    /// The id the orchestrator assigned; kept across re-registrations.
    pub id: Option<Ulid>,
    /// When the last registration or ping succeeded.
    pub last_ping: Option<SystemTime>,
    /// The last reason registration failed, if it did.
    pub error: Option<RegistrationError>,
    /// Keepalive pings that failed in a row (0 while the orchestrator answers).
    pub ping_failures: u32,
}

/// Reads the registration's state; clone freely, reads take no lock on the request path.
///
/// ```
/// use servicekit::{Phase, RegistrationLayer};
///
/// let registration = RegistrationLayer::builder()
///     .orchestrator_url("http://orchestrator:9000")
///     .build()?;
/// let handle = registration.handle();
/// // Nothing has started yet: the layer was not applied inside a tokio runtime.
/// assert_eq!(handle.status().phase, Phase::NotStarted);
/// assert!(!handle.is_registered());
/// # Ok::<(), servicekit::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct RegistrationHandle {
    rx: watch::Receiver<Status>,
}

impl RegistrationHandle {
    pub(crate) fn new(rx: watch::Receiver<Status>) -> Self {
        RegistrationHandle { rx }
    }

    /// A copy of the current state.
    pub fn status(&self) -> Status {
        self.rx.borrow().clone()
    }

    /// The registered id, if registered.
    pub fn id(&self) -> Option<Ulid> {
        let s = self.rx.borrow();
        (s.phase == Phase::Registered).then_some(s.id).flatten()
    }

    /// When the last registration or ping succeeded.
    pub fn last_ping(&self) -> Option<SystemTime> {
        self.rx.borrow().last_ping
    }

    /// Whether the service is currently registered.
    pub fn is_registered(&self) -> bool {
        self.rx.borrow().phase == Phase::Registered
    }

    /// Waits until `pred` holds for the state, at most `within`; returns the state then, or
    /// `None` on timeout.
    pub async fn wait_for(
        &self,
        within: Duration,
        mut pred: impl FnMut(&Status) -> bool,
    ) -> Option<Status> {
        let mut rx = self.rx.clone();
        let waited = tokio::time::timeout(within, rx.wait_for(|s| pred(s))).await;
        match waited {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// Waits until registered, at most `within`; returns the id.
    pub async fn wait_registered(&self, within: Duration) -> Option<Ulid> {
        self.wait_for(within, |s| s.phase == Phase::Registered)
            .await
            .and_then(|s| s.id)
    }
}

/// The one writer of the registration state: each method is one transition of the lifecycle.
/// Cheap to clone (the lifecycle and its task each hold one).
#[derive(Clone)]
pub(crate) struct StatusWriter {
    tx: Arc<watch::Sender<Status>>,
    /// With `fail_on_error`, giving up means [`Phase::Failed`] (the shutdown hook fires).
    fail_on_error: bool,
}

impl StatusWriter {
    pub(crate) fn new(fail_on_error: bool) -> StatusWriter {
        let (tx, _) = watch::channel(Status::default());
        StatusWriter {
            tx: Arc::new(tx),
            fail_on_error,
        }
    }

    pub(crate) fn fail_on_error(&self) -> bool {
        self.fail_on_error
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Status> {
        self.tx.subscribe()
    }

    pub(crate) fn snapshot(&self) -> Status {
        self.tx.borrow().clone()
    }

    /// Waiting for the local server (set before the task is spawned, so a shutdown hook that
    /// fires at once waits for the task).
    pub(crate) fn waiting_for_server(&self) {
        self.tx.send_modify(|s| s.phase = Phase::WaitingForServer);
    }

    /// Registering, for the first time or again.
    pub(crate) fn registering(&self) {
        self.tx.send_modify(|s| s.phase = Phase::Registering);
    }

    /// The orchestrator confirmed a registration under `id`.
    pub(crate) fn registered(&self, id: Ulid) {
        self.tx.send_modify(|s| {
            s.id = Some(id);
            confirmed(s);
        });
    }

    /// A ping succeeded.
    pub(crate) fn pinged(&self) {
        self.tx.send_modify(confirmed);
    }

    /// `failures` pings in a row failed; once the entry must have `expired`, the service is
    /// no longer registered. A `rejected` ping is a configuration problem worth showing.
    pub(crate) fn ping_failed(
        &self,
        failures: u32,
        expired: bool,
        rejected: Option<RegistrationError>,
    ) {
        self.tx.send_modify(|s| {
            s.ping_failures = failures;
            if expired {
                s.phase = Phase::Registering;
            }
            if rejected.is_some() {
                s.error = rejected;
            }
        });
    }

    /// Every attempt failed, but without `fail_on_error` it keeps trying in the background:
    /// the phase stays [`Phase::Registering`] and the error says why.
    pub(crate) fn retrying_in_background(&self, error: RegistrationError) {
        self.tx.send_modify(|s| s.error = Some(error));
    }

    /// Registration ended for good: [`Phase::Failed`] with `fail_on_error`,
    /// [`Phase::Unregistered`] (keep serving) without.
    pub(crate) fn give_up(&self, error: RegistrationError) {
        let phase = if self.fail_on_error {
            Phase::Failed
        } else {
            Phase::Unregistered
        };
        self.tx.send_modify(|s| {
            s.phase = phase;
            s.error = Some(error);
        });
    }

    /// Shutdown was requested: deregistering.
    pub(crate) fn deregistering(&self) {
        self.tx.send_modify(|s| s.phase = Phase::Deregistering);
    }

    /// The task is done after shutdown.
    pub(crate) fn stopped(&self) {
        self.tx.send_modify(|s| s.phase = Phase::Stopped);
    }
}

/// The orchestrator just confirmed the entry (a registration or a ping).
fn confirmed(s: &mut Status) {
    s.phase = Phase::Registered;
    s.last_ping = Some(SystemTime::now());
    s.ping_failures = 0;
    s.error = None;
}
