//! The watch feed: `GET /services?watch=true` as Server-Sent Events (the wire contract is in
//! the README, "Watch the registry").
//!
//! - [`hub`]: the one reader of the store's change log per process, fanning changes out;
//! - [`session`]: one watcher: snapshot or resume, its filter, its known ids, heartbeats;
//! - [`sse`]: the wire framing.
//!
//! [`Watch`] is what the API holds: the hub, the watcher limit and the tuning. The server
//! runs the hub's task ([`hub::run`]) and closes it on shutdown, which ends every stream.

pub mod hub;
pub mod session;
pub mod sse;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::Response;
use tokio::sync::Semaphore;
use tower_http::BoxError;

use crate::api::{ApiBody, Bounded, ListBody};
use crate::metrics::Metrics;
use crate::problem::ApiError;
use crate::store::{Cursor, ListFilter, Listing, Store, LIST_BATCH};
pub use hub::{Hub, HubMessage};
use session::{Session, SnapshotReason, Start};

/// How long a new watcher waits for the hub to have read the store's head (only right after
/// start, or while the store is down) before a 503.
const READY_WAIT: Duration = Duration::from_millis(2500);

/// Knobs of the watch feed that tests turn; the defaults are what the orchestrator runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchTuning {
    /// A comment line goes out after this much silence (the contract promises at most
    /// [`servicekit::protocol::WATCH_HEARTBEAT`]).
    pub heartbeat: Duration,
    /// How long a session waits for its client to take the next message before dropping it.
    pub send_timeout: Duration,
    /// Messages the hub's channel keeps for the slowest session; a session further behind
    /// re-snapshots.
    pub hub_capacity: usize,
    /// Messages a session queues ahead of its connection.
    pub body_capacity: usize,
}

impl Default for WatchTuning {
    fn default() -> Self {
        WatchTuning {
            heartbeat: Duration::from_secs(10),
            send_timeout: Duration::from_secs(15),
            hub_capacity: 1024,
            body_capacity: 4,
        }
    }
}

/// The watch feed's state in the API.
#[derive(Debug)]
pub struct Watch {
    hub: Arc<Hub>,
    watchers: Arc<Semaphore>,
    max_watchers: usize,
    tuning: WatchTuning,
}

impl Watch {
    /// At most `max_watchers` sessions at once.
    pub fn new(max_watchers: usize, tuning: WatchTuning) -> Self {
        Watch {
            hub: Arc::new(Hub::new(tuning.hub_capacity)),
            watchers: Arc::new(Semaphore::new(max_watchers)),
            max_watchers,
            tuning,
        }
    }

    /// The hub the server runs.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Sessions running now.
    pub fn watchers(&self) -> usize {
        self.max_watchers - self.watchers.available_permits()
    }

    /// Starts a session for `filter` and answers with its stream. Everything that can fail
    /// before the first byte (the limit, the hub, the store's first answer) is a problem
    /// answer instead of a stream cut short.
    pub(crate) async fn answer<S: Store>(
        &self,
        store: &Arc<Bounded<S>>,
        listings: &Arc<Semaphore>,
        metrics: &Arc<Metrics>,
        filter: ListFilter,
        last_event_id: Option<&HeaderValue>,
    ) -> Result<Response<ApiBody>, ApiError> {
        let permit =
            self.watchers
                .clone()
                .try_acquire_owned()
                .map_err(|_| ApiError::TooManyWatchers {
                    limit: self.max_watchers,
                })?;
        let Some((head, rx)) = self.hub.subscribe_within(READY_WAIT).await else {
            return Err(ApiError::StoreUnavailable(
                "the watch feed is not reading the store's change log yet".into(),
            ));
        };
        let resume = last_event_id
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().parse::<Cursor>().ok());
        let missed = match resume {
            Some(Some(after)) => session::missed(&**store, after, head).await?,
            _ => None,
        };
        let start = match missed {
            Some((changes, position)) => Start::Resume { changes, position },
            None => {
                let reason = match resume {
                    Some(_) => SnapshotReason::ResumeGap,
                    None => SnapshotReason::Start,
                };
                let place = crate::api::listing_place(listings).await?;
                let mut listing = store.listing(filter.clone(), None).await?;
                let first = listing.next_page(LIST_BATCH).await?;
                Start::Snapshot {
                    reason,
                    listing,
                    first,
                    place,
                }
            }
        };
        let (tx, rx_body) =
            tokio::sync::mpsc::channel::<Result<Bytes, BoxError>>(self.tuning.body_capacity);
        let session = Session {
            store: store.clone(),
            listings: listings.clone(),
            hub: self.hub.clone(),
            metrics: metrics.clone(),
            filter,
            tuning: self.tuning,
            out: tx,
            closed: self.hub.closed(),
            rx,
            position: head,
            known: Default::default(),
            resumed: false,
            denied: Default::default(),
            last_sent: tokio::time::Instant::now(),
            _guard: (permit, metrics.watcher_started()),
        };
        tokio::spawn(session.run(start));
        let mut response = Response::new(ApiBody::Stream(ListBody::new(rx_body)));
        sse::headers(response.headers_mut());
        Ok(response)
    }
}
