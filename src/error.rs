//! Why registration ended for good, with the typed cause behind it.
//!
//! Errors keep their causes as [`source`](std::error::Error::source)s instead of flattening
//! them into strings, so an application can match on what went wrong and a log line can
//! print the whole chain (see [`ErrorChain`]).

use std::fmt;
use std::time::Duration;

use crate::client::ClientError;
use crate::config::ConfigError;

/// Why registration stopped trying (or, without `fail_on_error`, why it is still retrying in
/// the background: see [`Status::error`](crate::Status::error)).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RegistrationError {
    /// The configuration could not be resolved; nothing was sent.
    #[error("registration is not configured correctly")]
    Config(#[source] ConfigError),
    /// The local server never accepted a connection (or never answered the health path with
    /// a 2xx) within `startup_timeout`.
    #[error("the local server never answered on {target} within {waited:?}; is the port ({port}) right?")]
    ServerNotReady {
        /// What was probed: `127.0.0.1:<port>` or `http://127.0.0.1:<port><health_path>`.
        target: String,
        /// The port the service advertises.
        port: u16,
        /// How long it waited.
        waited: Duration,
    },
    /// Every attempt failed with an error worth retrying (network, timeout, 5xx, 429).
    #[error("registration failed after {attempts} attempt(s)")]
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        #[source]
        last: ClientError,
    },
    /// The orchestrator refused the request for a reason retrying cannot fix (400, 401, 403,
    /// 404, 405, 422, ...): a configuration problem. `hint` says what to check.
    #[error("the orchestrator rejected the request (a configuration problem){}", hint_text(.hint))]
    Rejected {
        /// The orchestrator's answer.
        #[source]
        source: ClientError,
        /// What to check, when the answer suggests it (e.g. a wrong registration URL).
        hint: Option<String>,
    },
    /// The registration task itself ended unexpectedly (a bug).
    #[error("the registration task ended unexpectedly: {0}")]
    Internal(String),
}

fn hint_text(hint: &Option<String>) -> String {
    hint.as_ref().map(|h| format!(": {h}")).unwrap_or_default()
}

/// Displays an error followed by each of its sources, `: `-separated, for log lines.
///
/// ```
/// use servicekit::error::ErrorChain;
/// let e = std::io::Error::other("disk full");
/// assert_eq!(ErrorChain(&e).to_string(), "disk full");
/// ```
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'a));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
