//! The hub: the one reader of the store's change log in this process, fanning each change
//! out to every watcher session on a bounded broadcast channel.
//!
//! One reader per process instead of one per watcher keeps the store's load independent of
//! the number of watchers (Valkey serves the blocking read on a connection of its own). The
//! channel is bounded: a session that falls more than its capacity behind is told it lagged
//! and re-snapshots, so a slow watcher never makes the hub buffer more.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use crate::logsafe::Untrusted;
use crate::metrics::Metrics;
use crate::store::{Change, Changes, Cursor, Store, StoreError, Subject};

/// Changes the hub asks the store for at once.
const BATCH: usize = 256;
/// How long one read of the hub waits for a change.
const READ_WAIT: Duration = Duration::from_secs(1);
/// First and longest pause after a failed store read.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A change with its data encoded once for every session: with thousands of watchers, JSON
/// per session and change was most of the fan-out's cost.
#[derive(Debug)]
pub struct Encoded {
    pub change: Change,
    /// The JSON of the change's record, when it has one.
    pub record: Option<Vec<u8>>,
    /// The JSON of the removal data made from that record (see `RemovedService`).
    pub removed: Option<Vec<u8>>,
}

impl Encoded {
    /// Encodes `change`'s data; a record that cannot be encoded is left to the sessions (which
    /// report the error).
    pub fn new(change: Change) -> Self {
        let (record, removed) = match &change.subject {
            Subject::Record(r) => (
                serde_json::to_vec(&**r).ok(),
                serde_json::to_vec(&change.subject.removed()).ok(),
            ),
            Subject::Known { .. } => (None, None),
        };
        Encoded {
            change,
            record,
            removed,
        }
    }
}

/// What the hub sends its sessions.
#[derive(Debug, Clone)]
pub enum HubMessage {
    /// The next change of the log.
    Change(Arc<Encoded>),
    /// The store's log lost changes the hub had not read: every session starts over from a
    /// snapshot.
    Gap,
}

/// The hub's shared state: the broadcast channel and the cursor of the last change sent on
/// it. Subscribing reads both under one lock, so a session's receiver gets exactly the
/// changes after the head it was given.
pub struct Hub {
    /// `None` until the hub read the store's head once.
    head: Mutex<Option<Cursor>>,
    tx: broadcast::Sender<HubMessage>,
    ready: watch::Sender<bool>,
    closed: watch::Sender<bool>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("head", &*self.lock())
            .field("receivers", &self.tx.receiver_count())
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub whose channel keeps `capacity` (≥ 1) messages for its slowest session.
    pub fn new(capacity: usize) -> Self {
        Hub {
            head: Mutex::new(None),
            tx: broadcast::channel(capacity.max(1)).0,
            ready: watch::channel(false).0,
            closed: watch::channel(false).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Cursor>> {
        // Only a cursor behind it: a panic elsewhere cannot leave it half-written.
        self.head.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cursor of the last change sent, and a receiver of everything sent after it;
    /// `None` before the hub read the store's head or after it closed.
    pub fn subscribe(&self) -> Option<(Cursor, broadcast::Receiver<HubMessage>)> {
        if *self.closed.borrow() {
            return None;
        }
        let head = self.lock();
        head.map(|head| (head, self.tx.subscribe()))
    }

    /// [`Hub::subscribe`], waiting up to `wait` for the hub to be ready.
    pub async fn subscribe_within(
        &self,
        wait: Duration,
    ) -> Option<(Cursor, broadcast::Receiver<HubMessage>)> {
        let mut ready = self.ready.subscribe();
        let _ = tokio::time::timeout(wait, ready.wait_for(|r| *r)).await;
        self.subscribe()
    }

    /// Turns true when the hub stops: sessions end their streams.
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Messages waiting in the channel for the slowest session (at most its capacity).
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    /// Sends a batch of changes and moves the head past them.
    fn publish(&self, batch: Vec<Change>) {
        let mut head = self.lock();
        for change in batch {
            let cursor = change.cursor;
            // Nobody watches right now (subscribing takes this lock): nothing to encode.
            if self.tx.receiver_count() > 0 {
                let _ = self
                    .tx
                    .send(HubMessage::Change(Arc::new(Encoded::new(change))));
            }
            *head = Some(cursor);
        }
    }

    /// Starts over at `head`; with `gap`, tells every session to re-snapshot.
    fn restart(&self, at: Cursor, gap: bool) {
        let mut head = self.lock();
        *head = Some(at);
        if gap {
            let _ = self.tx.send(HubMessage::Gap);
        }
        drop(head);
        self.ready.send_replace(true);
    }

    fn head(&self) -> Option<Cursor> {
        *self.lock()
    }

    /// Ends every session and refuses new ones.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }
}

/// Runs the hub over `store` until `stop` turns true, then closes it.
pub async fn run<S: Store>(
    store: &S,
    hub: &Hub,
    metrics: &Metrics,
    mut stop: watch::Receiver<bool>,
) {
    tokio::select! {
        () = read_forever(store, hub, metrics) => {}
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
    hub.close();
}

/// The pause after each failed store read in a row: doubling up to [`BACKOFF_MAX`].
struct Backoff(Duration);

impl Backoff {
    fn failed(&mut self, what: &'static str, e: &StoreError) -> Duration {
        // The error may quote what the store sent: escaped.
        tracing::warn!(error = %Untrusted(&e.to_string()), read = what, retry_in = ?self.0,
            "watch.hub_read_failed");
        let pause = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        pause
    }
}

async fn read_forever<S: Store>(store: &S, hub: &Hub, metrics: &Metrics) {
    let mut backoff = Backoff(BACKOFF_MIN);
    loop {
        let Some(head) = hub.head() else {
            match store.change_head().await {
                Ok(at) => hub.restart(at, false),
                Err(e) => tokio::time::sleep(backoff.failed("head", &e)).await,
            }
            continue;
        };
        match store.changes(head, BATCH, READ_WAIT).await {
            Ok(Changes::Changes(batch)) => {
                backoff = Backoff(BACKOFF_MIN);
                metrics.watch_hub_read(batch.len());
                hub.publish(batch);
            }
            Ok(Changes::Gap) => match store.change_head().await {
                Ok(at) => {
                    tracing::warn!(after = %head, "watch.hub_gap: sessions re-snapshot");
                    hub.restart(at, true);
                }
                Err(e) => tokio::time::sleep(backoff.failed("head", &e)).await,
            },
            Err(e) => tokio::time::sleep(backoff.failed("changes", &e)).await,
        }
    }
}
