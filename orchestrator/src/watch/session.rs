//! One watcher session: what it has told its client, and what it tells it next.
//!
//! A session starts with a snapshot (the list answer for its filter, streamed page by page)
//! or, when the client resumes with `Last-Event-ID` and the store still holds every change
//! after it, with just those changes. Then it turns the hub's changes into events for its
//! filter, remembering the ids (and last records) it told the client about, so that a record
//! renamed away becomes `deregistered` and a removal carries the last record the client saw.
//! It re-snapshots when it falls behind the hub or the hub hits a gap, writes a heartbeat
//! after silence, and ends when the client stops reading, goes away, or the server stops.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use servicekit::protocol::{RemovedService, ServiceRecord, WatchEventKind};
use tokio::sync::{broadcast, mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower_http::BoxError;
use ulid::Ulid;

use super::hub::{Encoded, Hub, HubMessage};
use super::{sse, WatchTuning};
use crate::api::Bounded;
use crate::logsafe::Untrusted;
use crate::metrics::{Metrics, WatcherGuard};
use crate::store::{
    Change, ChangeKind, Changes, Cursor, ListFilter, Listing, Store, StoreError, Subject,
    LIST_BATCH,
};

/// Changes a resuming session reads from the store at once.
const RESUME_BATCH: usize = 256;
/// The most changes a resume replays; a client further behind gets a snapshot instead, so a
/// resume never holds more than this many records in memory.
const RESUME_MAX: usize = 1024;
/// The most ids a resumed session remembers as told `deregistered` (or never to be told):
/// past it, the session starts over with a snapshot, which needs no such memory.
const DENIED_MAX: usize = 4096;

/// Why a session sends a snapshot: the `reason` label of `servicekit_watch_snapshots_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotReason {
    /// A new watcher without `Last-Event-ID`.
    Start,
    /// `Last-Event-ID` was unusable: unparsable, beyond the head, older than the log, or an
    /// entry the log no longer holds (a failover lost it).
    ResumeGap,
    /// The session fell more than the hub's channel behind.
    Lagged,
    /// The hub found a gap in the store's log.
    StoreGap,
    /// A resumed session had to remember too many ids the client may not know.
    ResumeBound,
}

impl SnapshotReason {
    pub const ALL: [SnapshotReason; 5] = [
        SnapshotReason::Start,
        SnapshotReason::ResumeGap,
        SnapshotReason::Lagged,
        SnapshotReason::StoreGap,
        SnapshotReason::ResumeBound,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            SnapshotReason::Start => "start",
            SnapshotReason::ResumeGap => "resume_gap",
            SnapshotReason::Lagged => "lagged",
            SnapshotReason::StoreGap => "store_gap",
            SnapshotReason::ResumeBound => "resume_bound",
        }
    }
}

/// How a session begins.
pub enum Start<L> {
    /// With a snapshot whose listing is open and whose first page is read.
    Snapshot {
        reason: SnapshotReason,
        listing: L,
        first: Vec<Arc<ServiceRecord>>,
        /// The API's listing place, held until the snapshot is sent.
        place: OwnedSemaphorePermit,
    },
    /// With the changes the client missed, up to `position`.
    Resume {
        changes: Vec<Change>,
        position: Cursor,
    },
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// The server stops.
    Closed,
    /// The client went away.
    Gone,
    /// The client took nothing for the send timeout.
    Stalled,
    /// The store failed during a snapshot.
    Store(StoreError),
    /// An event could not be encoded.
    Encode(serde_json::Error),
}

/// The changes after `after` up to `head` (the hub's head), and the cursor the session is at
/// after them; `None` when the store no longer has them all (or never had `after`).
pub async fn missed<S: Store>(
    store: &S,
    after: Cursor,
    head: Cursor,
) -> Result<Option<(Vec<Change>, Cursor)>, StoreError> {
    let mut changes = Vec::new();
    let mut position = after;
    while position < head {
        // The first read also checks `after` itself: a cursor beyond the store's head is a gap.
        let batch = match store
            .changes(position, RESUME_BATCH, std::time::Duration::ZERO)
            .await?
        {
            Changes::Gap => return Ok(None),
            Changes::Changes(batch) => batch,
        };
        if batch.is_empty() {
            // The log ends before the hub's head (or stops at an entry it cannot read):
            // going on from the head would skip what lies between.
            return Ok(None);
        }
        for change in batch {
            if change.cursor > head {
                // The hub sends it.
                return Ok(Some((changes, position)));
            }
            position = change.cursor;
            changes.push(change);
        }
        if changes.len() > RESUME_MAX {
            return Ok(None);
        }
    }
    if after > head {
        // Beyond the hub's head: ask the store whether it is beyond the log's too.
        return match store.changes(after, 1, std::time::Duration::ZERO).await? {
            Changes::Gap => Ok(None),
            Changes::Changes(_) => Ok(Some((changes, position))),
        };
    }
    Ok(Some((changes, position)))
}

/// One watcher (see the module docs). Built by [`super::Watch::answer`].
pub struct Session<S: Store> {
    pub(super) store: Arc<Bounded<S>>,
    pub(super) listings: Arc<Semaphore>,
    pub(super) hub: Arc<Hub>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) filter: ListFilter,
    pub(super) tuning: WatchTuning,
    pub(super) out: mpsc::Sender<Result<Bytes, BoxError>>,
    pub(super) closed: watch::Receiver<bool>,
    pub(super) rx: broadcast::Receiver<HubMessage>,
    /// The cursor of the last change dealt with (sent or filtered out).
    pub(super) position: Cursor,
    /// The ids the client was told about, with the last record it got for each.
    pub(super) known: HashMap<Ulid, Arc<ServiceRecord>>,
    /// Resumed without a snapshot: the client may know ids `known` does not.
    pub(super) resumed: bool,
    /// Resumed sessions: ids told `deregistered` for a non-matching update (said once).
    pub(super) denied: HashSet<Ulid>,
    pub(super) last_sent: Instant,
    pub(super) _guard: (OwnedSemaphorePermit, WatcherGuard),
}

impl<S: Store> Session<S> {
    /// Runs the session until its stream ends.
    pub async fn run(mut self, start: Start<<Bounded<S> as Store>::Listing>) {
        let ended = self.serve(start).await;
        match ended {
            Err(End::Stalled) => {
                self.metrics.watcher_dropped();
                tracing::debug!("watch.session_dropped: the client stopped reading");
            }
            Err(End::Store(e)) => {
                tracing::debug!(error = %Untrusted(&e.to_string()), "watch.session_ended: snapshot cut off by a store error");
                // Ends the body with an error: the client sees a cut-off stream, never a
                // short snapshot that looks complete.
                let _ = self.out.try_send(Err(e.into()));
            }
            Err(End::Encode(e)) => {
                tracing::warn!(error = %e, "watch.session_ended: cannot encode an event");
                let _ = self.out.try_send(Err(e.into()));
            }
            Err(End::Closed | End::Gone) | Ok(()) => {}
        }
    }

    async fn serve(&mut self, start: Start<<Bounded<S> as Store>::Listing>) -> Result<(), End> {
        self.send(sse::retry()).await?;
        match start {
            Start::Snapshot {
                reason,
                listing,
                first,
                place,
            } => {
                let head = self.position;
                self.snapshot(head, listing, first, reason).await?;
                drop(place);
            }
            Start::Resume { changes, position } => {
                self.resumed = true;
                let head = self.position;
                self.position = Cursor::ZERO;
                for change in changes {
                    self.forward(&Encoded::new(change)).await?;
                }
                // The hub sends what follows its head; skip what the store gave already.
                self.position = head.max(position);
            }
        }
        loop {
            let heartbeat_at = self.last_sent + self.tuning.heartbeat;
            let message = tokio::select! {
                biased;
                _ = self.closed.wait_for(|closed| *closed) => return Err(End::Closed),
                message = self.rx.recv() => Some(message),
                () = tokio::time::sleep_until(heartbeat_at) => None,
            };
            let Some(message) = message else {
                self.send(Bytes::from_static(sse::HEARTBEAT)).await?;
                continue;
            };
            match message {
                Ok(HubMessage::Change(change)) => self.forward(&change).await?,
                Ok(HubMessage::Gap) => self.resnapshot(SnapshotReason::StoreGap).await?,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.resnapshot(SnapshotReason::Lagged).await?;
                }
                Err(broadcast::error::RecvError::Closed) => return Err(End::Closed),
            }
        }
    }

    /// Hands `bytes` to the connection, waiting at most the send timeout.
    async fn send(&mut self, bytes: impl Into<Bytes>) -> Result<(), End> {
        let bytes = bytes.into();
        let sent = tokio::select! {
            biased;
            _ = self.closed.wait_for(|closed| *closed) => return Err(End::Closed),
            sent = tokio::time::timeout(self.tuning.send_timeout, self.out.send(Ok(bytes))) => sent,
        };
        match sent {
            Ok(Ok(())) => {
                self.last_sent = Instant::now();
                Ok(())
            }
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(End::Stalled),
        }
    }

    /// Starts over from the hub's current head with a fresh snapshot.
    async fn resnapshot(&mut self, reason: SnapshotReason) -> Result<(), End> {
        // Many sessions may re-snapshot at once (a store gap): keep the heartbeat going while
        // waiting for a listing place, or their clients would take the silence for a dead
        // connection and all reconnect.
        let place = loop {
            let heartbeat_at = self.last_sent + self.tuning.heartbeat;
            let waited = tokio::select! {
                biased;
                _ = self.closed.wait_for(|closed| *closed) => return Err(End::Closed),
                place = self.listings.clone().acquire_owned() => Some(place),
                () = tokio::time::sleep_until(heartbeat_at) => None,
            };
            match waited {
                Some(place) => break place.map_err(|_| End::Closed)?,
                None => self.send(Bytes::from_static(sse::HEARTBEAT)).await?,
            }
        };
        let Some((head, rx)) = self.hub.subscribe() else {
            return Err(End::Closed);
        };
        // The old receiver's backlog goes now, not after the snapshot.
        self.rx = rx;
        let mut listing = self
            .store
            .listing(self.filter.clone(), None)
            .await
            .map_err(End::Store)?;
        let first = listing.next_page(LIST_BATCH).await.map_err(End::Store)?;
        self.snapshot(head, listing, first, reason).await?;
        drop(place);
        Ok(())
    }

    /// Streams the snapshot at `head`: `first`, then the rest of `listing`, as one event. The
    /// known ids become exactly the snapshot's.
    async fn snapshot<L: Listing>(
        &mut self,
        head: Cursor,
        mut listing: L,
        first: Vec<Arc<ServiceRecord>>,
        reason: SnapshotReason,
    ) -> Result<(), End> {
        self.known.clear();
        self.denied.clear();
        self.resumed = false;
        self.position = head;
        let mut part = sse::event_head(head, WatchEventKind::Snapshot);
        part.extend_from_slice(b"{\"services\":[");
        let mut count = 0usize;
        let mut page = first;
        while !page.is_empty() {
            for record in page {
                if count > 0 {
                    part.push(b',');
                }
                serde_json::to_writer(&mut part, &*record).map_err(End::Encode)?;
                count += 1;
                self.known.insert(record.id, record);
            }
            self.send(std::mem::take(&mut part)).await?;
            page = listing.next_page(LIST_BATCH).await.map_err(End::Store)?;
        }
        part.extend_from_slice(format!("],\"count\":{count}}}").as_bytes());
        part.extend_from_slice(sse::EVENT_END);
        self.send(part).await?;
        self.metrics.watch_snapshot(reason.as_str());
        self.metrics.watch_event(WatchEventKind::Snapshot);
        Ok(())
    }

    /// Sends what `change` means for this watcher, if anything.
    async fn forward(&mut self, encoded: &Encoded) -> Result<(), End> {
        let change = &encoded.change;
        if change.cursor <= self.position {
            return Ok(()); // in the snapshot or the resumed changes already
        }
        self.position = change.cursor;
        let applied = self.apply(change);
        if self.resumed && self.denied.len() > DENIED_MAX {
            return self.resnapshot(SnapshotReason::ResumeBound).await;
        }
        let Some((kind, data)) = applied else {
            return Ok(());
        };
        // The hub's encoding when the data is the change's own record (always, for a
        // registration; for a removal, when the client's last record is the store's last).
        let own = |record: &Arc<ServiceRecord>| match &change.subject {
            Subject::Record(r) => Arc::ptr_eq(r, record) || **r == **record,
            Subject::Known { .. } => false,
        };
        let bytes = match data {
            Data::Record(record) => match &encoded.record {
                Some(json) if own(&record) => Ok(sse::event_encoded(change.cursor, kind, json)),
                _ => sse::event(change.cursor, kind, &*record),
            },
            Data::Removed { last, removed } => match (&encoded.removed, last) {
                (Some(json), Some(last)) if own(&last) => {
                    Ok(sse::event_encoded(change.cursor, kind, json))
                }
                _ => sse::event(change.cursor, kind, &removed),
            },
        }
        .map_err(End::Encode)?;
        self.send(bytes).await?;
        self.metrics.watch_event(kind);
        Ok(())
    }

    /// The event `change` becomes for this watcher, updating what the client knows.
    fn apply(&mut self, change: &Change) -> Option<(WatchEventKind, Data)> {
        let id = change.subject.id();
        match (change.kind, &change.subject) {
            (ChangeKind::Registered | ChangeKind::Updated, Subject::Record(record)) => {
                if self.filter.matches(record) {
                    self.denied.remove(&id);
                    let kind = match self.known.insert(id, record.clone()) {
                        Some(_) => WatchEventKind::Updated,
                        None => WatchEventKind::Registered,
                    };
                    Some((kind, Data::Record(record.clone())))
                } else if self.resumed
                    && change.kind == ChangeKind::Registered
                    && !self.known.contains_key(&id)
                {
                    // A new entry the client cannot know (it would have seen its earlier
                    // removal): nothing to say now, nor when it changes or goes.
                    self.denied.insert(id);
                    None
                } else if self.known.remove(&id).is_some()
                    || (self.resumed
                        && change.kind == ChangeKind::Updated
                        && self.denied.insert(id))
                {
                    // (A resumed session cannot tell whether the client knows the id; a new
                    // entry's id it cannot know: it would have seen its earlier removal.)
                    // Renamed (or re-described) away: gone from this watcher's set.
                    let removed = RemovedService::from(&**record);
                    Some((
                        WatchEventKind::Deregistered,
                        Data::Removed {
                            last: Some(record.clone()),
                            removed,
                        },
                    ))
                } else {
                    None
                }
            }
            // A registration always carries its record; nothing to say without one.
            (ChangeKind::Registered | ChangeKind::Updated, Subject::Known { .. }) => None,
            (ChangeKind::Deregistered | ChangeKind::Expired, subject) => {
                let kind = change.kind.event();
                if let Some(last) = self.known.remove(&id) {
                    let removed = RemovedService::from(&*last);
                    return Some((
                        kind,
                        Data::Removed {
                            last: Some(last),
                            removed,
                        },
                    ));
                }
                let told = self.denied.remove(&id);
                (self.resumed && !told && self.may_match(subject)).then(|| {
                    let removed = subject.removed();
                    (
                        kind,
                        Data::Removed {
                            last: None,
                            removed,
                        },
                    )
                })
            }
        }
    }

    /// Whether a removed entry may have matched the filter, judged by what every subject
    /// has: its display name and URL (info conditions need the whole record).
    fn may_match(&self, subject: &Subject) -> bool {
        self.filter
            .display_name
            .as_ref()
            .is_none_or(|name| name == subject.display_name())
            && self
                .filter
                .url
                .as_ref()
                .is_none_or(|url| url == subject.url())
    }
}

/// The data of one event.
enum Data {
    Record(Arc<ServiceRecord>),
    /// A removal's data, and the record it was made from when it is the client's last one.
    Removed {
        last: Option<Arc<ServiceRecord>>,
        removed: RemovedService,
    },
}
