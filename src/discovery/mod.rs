//! Discover the instances of a service and call them (cargo feature `discovery`).
//!
//! A [`Watcher`] follows the orchestrator's watch feed (`GET /services?watch=true`, Server-Sent
//! Events) for a [`Filter`] and keeps a local cache of the matching [`Instance`]s, which it
//! keeps serving through orchestrator restarts and outages (its [`state`](Watcher::state) is
//! then [`WatchState::Stale`]) until a new snapshot replaces it. [`Watcher::discover`] turns the
//! cache into a `tower::discover` stream, and [`BalancedClient`] puts tower's power-of-two-choices
//! balancer, retries and ejection on top. With the `tonic` feature, [`tonic::balance_channel`]
//! feeds a tonic `Channel` from the same watcher. Only `passing` and `warning` instances are
//! used by default ([`WatcherBuilder::health`]). The README's "Discover and call services"
//! section shows them together.

mod balance;
mod cache;
mod discover;
mod error;
mod filter;
mod sse;
#[cfg(feature = "tonic")]
pub mod tonic;
mod watcher;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use ulid::Ulid;

use crate::protocol::ServiceRecord;

pub use balance::{BalancedClient, BalancedClientBuilder, ServedBy};
pub use discover::Changes;
pub use error::Error;
pub use filter::Filter;
pub use watcher::{Watcher, WatcherBuilder, DEFAULT_HEALTH};

/// One registered instance, as the watch feed last described it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Instance {
    /// The registration's id (the key of the `tower::discover` changes).
    pub id: Ulid,
    /// Where the instance answers, e.g. `http://10.0.0.7:8000`.
    pub url: String,
    /// The whole record.
    pub record: Arc<ServiceRecord>,
}

impl From<ServiceRecord> for Instance {
    fn from(record: ServiceRecord) -> Self {
        Instance {
            id: record.id,
            url: record.url.clone(),
            record: Arc::new(record),
        }
    }
}

impl Instance {
    /// Whether `other` describes the same registration of the same endpoint in the same
    /// health: same URL, info, registration time (`last_updated`: a re-registration is news)
    /// and health status, whatever its pings since. Pings move `last_ping_at` and
    /// `expires_at` (and a pushed report the health's `checked_at`) all the time, so a resync
    /// snapshot compared on those would re-announce every instance.
    pub fn same_registration(&self, other: &Instance) -> bool {
        self.id == other.id
            && self.url == other.url
            && self.record.info == other.record.info
            && self.record.last_updated == other.record.last_updated
            && self.record.health.status == other.record.health.status
    }
}

/// How current a [`Watcher`]'s cache is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WatchState {
    /// No snapshot yet: the cache is empty.
    Connecting,
    /// Connected to the feed: the cache follows the orchestrator.
    Live,
    /// The feed broke after a snapshot: the cache keeps the last known instances while the
    /// watcher reconnects (and resyncs).
    Stale,
}
