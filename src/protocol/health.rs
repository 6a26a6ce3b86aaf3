//! Instance health on the wire: the `health` of a record, the body of a ping that reports it,
//! and the `check` a registration declares for the orchestrator to run.
//!
//! A TTL ping proves that a process runs, not that it can serve; health says whether it can.
//! It comes from the service itself (push: a ping with a [`HealthReport`] body) or from the
//! orchestrator probing it (pull: a [`CheckSpec`]). The README's "Health" section has the
//! status rules.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Timestamp;

/// How an instance is doing. Discovery uses `passing` and `warning` instances by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Serving normally (what every instance is until something says otherwise).
    Passing,
    /// Serving, but under strain (an HTTP check answered 429).
    Warning,
    /// Not able to serve.
    Critical,
}

impl HealthStatus {
    /// Every status, best first.
    pub const ALL: [HealthStatus; 3] = [
        HealthStatus::Passing,
        HealthStatus::Warning,
        HealthStatus::Critical,
    ];

    /// The wire text: `passing`, `warning` or `critical`.
    pub const fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Passing => "passing",
            HealthStatus::Warning => "warning",
            HealthStatus::Critical => "critical",
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status text that is none of `passing`, `warning`, `critical`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown health status {0:?}: passing, warning or critical")]
pub struct HealthStatusError(String);

impl FromStr for HealthStatus {
    type Err = HealthStatusError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| HealthStatusError(text.chars().take(32).collect()))
    }
}

/// The longest `output` the orchestrator keeps, in bytes; longer output is cut at a character
/// boundary. Health output is a hint for people, not a log.
pub const MAX_HEALTH_OUTPUT: usize = 1024;

/// The `health` of a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The current status.
    pub status: HealthStatus,
    /// What the last report or check said (a check's answer, a service's own words); may be
    /// empty.
    #[serde(default)]
    pub output: String,
    /// When the status or output was last set; absent while nothing has reported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<Timestamp>,
}

impl Default for Health {
    /// `passing`, no output, never checked: what a registration starts with, and what a
    /// record from an orchestrator without health support reads as.
    fn default() -> Self {
        Health {
            status: HealthStatus::Passing,
            output: String::new(),
            checked_at: None,
        }
    }
}

impl Health {
    /// Whether this is the default health nothing has reported on yet.
    pub fn is_unreported(&self) -> bool {
        *self == Health::default()
    }
}

/// The optional body of `PUT /services/{id}/$ping`: the service's own health. A ping without
/// a body leaves the health as it is. Fields this version does not know are ignored, so a
/// newer client's report still pings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// The status the service reports.
    pub status: HealthStatus,
    /// Why, in a few words (cut to [`MAX_HEALTH_OUTPUT`] bytes by the orchestrator).
    #[serde(default)]
    pub output: String,
}

impl HealthReport {
    /// A report of `status` with `output`.
    pub fn new(status: HealthStatus, output: impl Into<String>) -> Self {
        HealthReport {
            status,
            output: output.into(),
        }
    }

    /// `passing`, with no output.
    pub fn passing() -> Self {
        Self::new(HealthStatus::Passing, "")
    }

    /// `critical`, saying why.
    pub fn critical(output: impl Into<String>) -> Self {
        Self::new(HealthStatus::Critical, output)
    }

    /// The health this report sets at `at`, its output cut to [`MAX_HEALTH_OUTPUT`] bytes.
    pub fn into_health(self, at: Timestamp) -> Health {
        let mut output = self.output;
        if output.len() > MAX_HEALTH_OUTPUT {
            let mut end = MAX_HEALTH_OUTPUT;
            while !output.is_char_boundary(end) {
                end -= 1;
            }
            output.truncate(end);
        }
        Health {
            status: self.status,
            output,
            checked_at: Some(at),
        }
    }
}

/// Default of [`CheckSpec::interval_seconds`].
pub const DEFAULT_CHECK_INTERVAL_SECONDS: u64 = 10;
/// Default of [`CheckSpec::timeout_seconds`].
pub const DEFAULT_CHECK_TIMEOUT_SECONDS: u64 = 2;
/// Default of [`CheckSpec::failures_before_critical`] and
/// [`CheckSpec::successes_before_passing`]: one odd result does not flip an instance.
pub const DEFAULT_CHECK_THRESHOLD: u32 = 2;

fn default_interval() -> u64 {
    DEFAULT_CHECK_INTERVAL_SECONDS
}
fn default_timeout() -> u64 {
    DEFAULT_CHECK_TIMEOUT_SECONDS
}
fn default_threshold() -> u32 {
    DEFAULT_CHECK_THRESHOLD
}

/// The `check` of a registration: how the orchestrator probes the instance. Exactly one of
/// `http`, `tcp` and `grpc` is set (the orchestrator refuses anything else with a 400, and a
/// field it does not know too: [`CHECK_FIELDS`]). Reading a record, unknown fields are
/// ignored, so a newer orchestrator's records still parse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    /// An HTTP GET: a path relative to the service URL (`/health`), or an absolute URL on the
    /// service's own host. 2xx is passing, 429 warning, anything else critical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// `true`: a TCP connect to the service URL's host and port; connecting is passing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<bool>,
    /// The standard gRPC health protocol (`grpc.health.v1.Health/Check`) for this service
    /// name (empty: the server as a whole), at the service URL. `SERVING` is passing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<String>,
    /// Seconds between two checks.
    #[serde(default = "default_interval")]
    pub interval_seconds: u64,
    /// Seconds one check may take, connecting included; a check that takes longer is critical.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// When set, an instance critical for this long is deregistered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deregister_critical_after_seconds: Option<u64>,
    /// Consecutive failing results (critical, or warning) before the status changes to it.
    #[serde(default = "default_threshold")]
    pub failures_before_critical: u32,
    /// Consecutive passing results before a warning or critical instance is passing again.
    #[serde(default = "default_threshold")]
    pub successes_before_passing: u32,
}

/// Every field of a [`CheckSpec`], as the orchestrator accepts them in a registration.
pub const CHECK_FIELDS: [&str; 8] = [
    "http",
    "tcp",
    "grpc",
    "interval_seconds",
    "timeout_seconds",
    "deregister_critical_after_seconds",
    "failures_before_critical",
    "successes_before_passing",
];

/// What a [`CheckSpec`] probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckTarget<'a> {
    /// An HTTP GET of this path or same-host URL.
    Http(&'a str),
    /// A TCP connect.
    Tcp,
    /// A gRPC health check of this service name.
    Grpc(&'a str),
}

impl CheckSpec {
    /// An HTTP check of `path` with the default interval, timeout and thresholds.
    pub fn http(path: impl Into<String>) -> Self {
        CheckSpec {
            http: Some(path.into()),
            ..Self::empty()
        }
    }

    /// A TCP check with the defaults.
    pub fn tcp() -> Self {
        CheckSpec {
            tcp: Some(true),
            ..Self::empty()
        }
    }

    /// A gRPC health check of `service` (empty: the whole server) with the defaults.
    pub fn grpc(service: impl Into<String>) -> Self {
        CheckSpec {
            grpc: Some(service.into()),
            ..Self::empty()
        }
    }

    fn empty() -> Self {
        CheckSpec {
            http: None,
            tcp: None,
            grpc: None,
            interval_seconds: DEFAULT_CHECK_INTERVAL_SECONDS,
            timeout_seconds: DEFAULT_CHECK_TIMEOUT_SECONDS,
            deregister_critical_after_seconds: None,
            failures_before_critical: DEFAULT_CHECK_THRESHOLD,
            successes_before_passing: DEFAULT_CHECK_THRESHOLD,
        }
    }

    /// The same check every `interval`; a timeout longer than that comes down to it.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval_seconds = interval.as_secs();
        self.timeout_seconds = self.timeout_seconds.min(self.interval_seconds);
        self
    }

    /// The same check with each probe limited to `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout_seconds = timeout.as_secs();
        self
    }

    /// The same check, deregistering an instance critical for `after`.
    pub fn deregister_critical_after(mut self, after: Duration) -> Self {
        self.deregister_critical_after_seconds = Some(after.as_secs());
        self
    }

    /// What the check probes; `Err` says why the spec names none or more than one.
    pub fn target(&self) -> Result<CheckTarget<'_>, &'static str> {
        match (&self.http, self.tcp, &self.grpc) {
            (Some(path), None | Some(false), None) => Ok(CheckTarget::Http(path)),
            (None, Some(true), None) => Ok(CheckTarget::Tcp),
            (None, None | Some(false), Some(service)) => Ok(CheckTarget::Grpc(service)),
            (None, None | Some(false), None) => Err("a check needs one of http, tcp or grpc"),
            _ => Err("a check takes only one of http, tcp or grpc"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_their_wire_text() {
        for s in HealthStatus::ALL {
            assert_eq!(s.as_str().parse::<HealthStatus>(), Ok(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert!("healthy".parse::<HealthStatus>().is_err());
    }

    #[test]
    fn a_check_needs_exactly_one_target_and_fills_defaults() {
        let c: CheckSpec = serde_json::from_str(r#"{"http":"/health"}"#).unwrap();
        assert_eq!(c, CheckSpec::http("/health"));
        assert_eq!(c.target(), Ok(CheckTarget::Http("/health")));
        let c: CheckSpec = serde_json::from_str(r#"{"tcp":true,"interval_seconds":3}"#).unwrap();
        assert_eq!((c.target(), c.interval_seconds), (Ok(CheckTarget::Tcp), 3));
        let none: CheckSpec = serde_json::from_str(r#"{"tcp":false}"#).unwrap();
        assert!(none.target().is_err());
        let two: CheckSpec = serde_json::from_str(r#"{"tcp":true,"grpc":""}"#).unwrap();
        assert!(two.target().is_err());
        // Unknown fields are ignored when reading (the orchestrator refuses them itself).
        assert!(serde_json::from_str::<CheckSpec>(r#"{"http":"/x","later":1}"#).is_ok());
        assert_eq!(
            CheckSpec::http("/x")
                .interval(Duration::from_secs(1))
                .timeout_seconds,
            1
        );
    }

    #[test]
    fn long_output_is_cut_at_a_character_boundary() {
        let at = Timestamp::from_millis(5);
        let h = HealthReport::critical("é".repeat(MAX_HEALTH_OUTPUT)).into_health(at);
        assert_eq!(h.output.len(), MAX_HEALTH_OUTPUT);
        assert_eq!(h.checked_at, Some(at));
        let h = HealthReport::critical("é".repeat(MAX_HEALTH_OUTPUT) + "x").into_health(at);
        assert!(h.output.len() <= MAX_HEALTH_OUTPUT && h.output.len() > MAX_HEALTH_OUTPUT - 2);
    }

    #[test]
    fn health_reads_with_defaults_and_hides_an_unset_checked_at() {
        let h: Health = serde_json::from_str(r#"{"status":"warning"}"#).unwrap();
        assert_eq!(
            (h.status, h.output.as_str(), h.checked_at),
            (HealthStatus::Warning, "", None)
        );
        assert_eq!(
            serde_json::to_value(Health::default()).unwrap(),
            serde_json::json!({"status": "passing", "output": ""})
        );
    }
}
