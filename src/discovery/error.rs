//! What can go wrong when discovering and calling services.

use std::sync::Arc;
use std::time::Duration;

use crate::config::ConfigError;

/// A boxed cause.
type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// Why a discovery call failed. Texts from the network are quoted, never printed raw.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The orchestrator URL (or another option) is wrong.
    #[error("discovery is not configured correctly")]
    Config(#[source] ConfigError),
    /// No instance was ready to take the request within the wait: none is registered, or
    /// every one was ejected.
    #[error("no instance of {filter} ready within {waited:?}")]
    NoInstance {
        /// The watch's filter.
        filter: String,
        /// How long the request waited.
        waited: Duration,
    },
    /// Every attempt failed before an answer arrived (connection refused, reset, closed).
    #[error("{method} {path} failed after {attempts} attempt(s), last on {instance}")]
    Transport {
        /// The request's method.
        method: http::Method,
        /// The request's path and query.
        path: String,
        /// Attempts made.
        attempts: u32,
        /// The URL of the instance of the last attempt.
        instance: String,
        /// What the HTTP client reported on the last attempt.
        #[source]
        source: Cause,
    },
    /// The instance did not answer within the request timeout (not retried: it may have acted).
    #[error("{method} {path}: no answer from {instance} within {after:?}")]
    Timeout {
        /// The request's method.
        method: http::Method,
        /// The request's path and query.
        path: String,
        /// The instance's URL.
        instance: String,
        /// The bound that passed.
        after: Duration,
    },
    /// The request cannot be sent: its URI is not a path and query, or an instance URL
    /// cannot be joined with it.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The answer's body could not be read.
    #[error("reading the answer's body from {instance} failed")]
    Body {
        /// The instance's URL.
        instance: String,
        /// What went wrong.
        #[source]
        source: Cause,
    },
    /// A watcher or a balanced client was created outside a tokio runtime (they spawn their
    /// background task on the current one).
    #[error("discovery needs a tokio runtime: create the Watcher / BalancedClient inside one")]
    NoRuntime,
    /// The balancer's background task is gone (its runtime shut down).
    #[error("the balancer is closed: {0}")]
    Closed(String),
}

impl Error {
    pub(crate) fn cause<E: std::error::Error + Send + Sync + 'static>(e: E) -> Cause {
        Arc::new(e)
    }
}
