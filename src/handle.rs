//! A cheap, cloneable view of the registration for the application itself, e.g. a readiness
//! endpoint that answers 503 until the service is registered.

use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use ulid::Ulid;

use crate::keepalive::RegistrationError;

/// Where the registration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// The layer has not been applied inside a tokio runtime yet.
    #[default]
    NotStarted,
    /// Waiting for the local server to answer on its port.
    WaitingForServer,
    /// Registering (first time, or again after the orchestrator forgot the entry). After
    /// `max_retries` failed attempts without `fail_on_error`, it stays here with
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
pub struct Status {
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

impl Status {
    /// Records that registration ended for good: `Failed` (the shutdown hook fires) with
    /// `fail_on_error`, `Unregistered` (keep serving) without.
    pub(crate) fn give_up(&mut self, fail_on_error: bool, error: RegistrationError) {
        self.phase = if fail_on_error {
            Phase::Failed
        } else {
            Phase::Unregistered
        };
        self.error = Some(error);
    }
}

/// Reads the registration's state; clone freely, reads take no lock on the request path.
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
