//! The embedded store: registrations in this process's memory.
//!
//! It is the zero-setup default, so `orchestrator` runs with nothing else installed. It gives
//! the same guarantees as the Valkey store within one process: one mutex makes every operation
//! atomic, expiry is checked on every read (an expired entry is gone the instant its deadline
//! passes, whether or not it was swept), and [`Store::sweep`] frees the memory of expired
//! entries. State is lost when the process exits; run several orchestrators on Valkey instead.
//!
//! Id bindings (see the store module docs) are two maps beside the entries: the URLs whose
//! entry expired, and the tombstones of deregistered ids, each kept for the binding grace and
//! dropped by [`Store::sweep`].
//!
//! Records are shared (`Arc`): a listing takes a page of them under the lock, a few hundred at
//! a time, and serialises them after releasing it, so a listing of 100k entries never keeps a
//! ping waiting for more than one page.
//!
//! The change log (for the watch feed) is a ring of the last [`CHANGE_LOG_LEN`] changes under
//! the same lock, so a change is logged atomically with the write it describes, and an entry
//! removed on expiry (by a read, the sweep or [`Store::reap`]) logs `Expired` exactly once: the
//! removal and the log entry are one step. A deadline index lets `reap` find due entries
//! without scanning all of them.
//!
//! Deadlines are [`tokio::time::Instant`]s, so expiry follows tokio's clock and can be tested
//! on paused time; the timestamps shown in records still come from the wall clock.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::{Bound, Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use servicekit::protocol::{Health, ServiceRecord, Timestamp};
use tokio::time::Instant;
use ulid::Ulid;

use super::{
    checker_replica_ok, mint_id, Access, Change, ChangeKind, Changes, Cursor, HealthSet, LeaseHash,
    LeaseOutcome, ListFilter, Listing, Pinged, Registered, Registration, Store, StoreError,
    StoreHealth, Subject, CHANGE_LOG_LEN,
};

/// Index entries a listing examines per hold of the lock.
const SCAN_STEP: usize = 1024;

/// In-process store; cheap to clone (clones share the same entries).
#[derive(Clone)]
pub struct MemoryStore {
    ttl: Duration,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    /// Ordered by id, which is registration order.
    entries: BTreeMap<Ulid, Entry>,
    by_url: HashMap<String, Ulid>,
    by_name: HashMap<String, BTreeSet<Ulid>>,
    /// URLs whose entry expired, with the id still bound to them until the instant given.
    expired: HashMap<String, (Ulid, Instant)>,
    /// Deregistered ids, with the URL they stay bound to until the instant given.
    tombstones: HashMap<Ulid, (String, Instant)>,
    /// How long bindings and tombstones outlive their entry.
    grace: Duration,
    /// Every entry's deadline, soonest first: what [`Store::reap`] and the sweep walk.
    deadlines: BTreeSet<(Instant, Ulid)>,
    log: ChangeLog,
    /// The health-checker replicas that announced themselves, with their deadline.
    checkers: HashMap<String, Instant>,
}

/// The ring of recent changes and what a reader needs to tell a gap.
struct ChangeLog {
    ring: VecDeque<Change>,
    /// How many changes the ring keeps.
    capacity: usize,
    /// The newest cursor handed out ([`Cursor::ZERO`] before the first change).
    head: Cursor,
    /// The newest change dropped from the ring: a reader after an older cursor missed it.
    last_dropped: Option<Cursor>,
    /// The first change this log ever held: an older cursor (other than ZERO) was handed out
    /// by another process, such as this orchestrator before a restart, whose changes this
    /// log never had.
    first: Option<Cursor>,
    /// Wakes the readers waiting in [`Store::changes`].
    notify: Arc<tokio::sync::Notify>,
}

impl Default for ChangeLog {
    fn default() -> Self {
        ChangeLog {
            ring: VecDeque::new(),
            capacity: CHANGE_LOG_LEN,
            head: Cursor::ZERO,
            last_dropped: None,
            first: None,
            notify: Arc::new(tokio::sync::Notify::new()),
        }
    }
}

impl ChangeLog {
    /// Appends a change under a cursor after every earlier one: wall-clock milliseconds, and a
    /// sequence number within the millisecond (or when the clock went back).
    fn push(&mut self, kind: ChangeKind, record: Arc<ServiceRecord>) {
        let ms = Timestamp::now().as_millis();
        let cursor = if ms > self.head.ms {
            Cursor { ms, seq: 0 }
        } else {
            Cursor {
                ms: self.head.ms,
                seq: self.head.seq + 1,
            }
        };
        self.head = cursor;
        self.first.get_or_insert(cursor);
        if self.ring.len() >= self.capacity {
            if let Some(old) = self.ring.pop_front() {
                self.last_dropped = Some(old.cursor);
            }
        }
        self.ring.push_back(Change {
            cursor,
            kind,
            subject: Subject::Record(record),
        });
        self.notify.notify_waiters();
    }

    /// At most `limit` changes after `after`; `None` for a gap.
    fn after(&self, after: Cursor, limit: usize) -> Option<Vec<Change>> {
        let foreign = after != Cursor::ZERO && self.first.is_some_and(|first| after < first);
        if after > self.head || foreign || self.last_dropped.is_some_and(|dropped| after < dropped)
        {
            return None;
        }
        let start = self.ring.partition_point(|c| c.cursor <= after);
        Some(self.ring.range(start..).take(limit).cloned().collect())
    }
}

struct Entry {
    record: Shared,
    deadline: Instant,
    /// The hash of the entry's lease token, when it is leased.
    lease: Option<LeaseHash>,
}

/// A record that listings may hold on to after the lock is released. Reads go through `Deref`;
/// writes through `DerefMut`, which copies the record only while a listing still holds the
/// version being changed (`Arc::make_mut`). It is deliberately not `Clone`: `.clone()` on it
/// copies the record itself, as it did before records were shared.
struct Shared(Arc<ServiceRecord>);

impl Deref for Shared {
    type Target = ServiceRecord;

    fn deref(&self) -> &ServiceRecord {
        &self.0
    }
}

impl DerefMut for Shared {
    fn deref_mut(&mut self) -> &mut ServiceRecord {
        Arc::make_mut(&mut self.0)
    }
}

impl MemoryStore {
    /// An empty store whose entries live `ttl` after their last registration or ping.
    pub fn new(ttl: Duration) -> Self {
        MemoryStore {
            ttl,
            inner: Arc::new(Mutex::new(Inner {
                grace: super::binding_grace(ttl),
                ..Inner::default()
            })),
        }
    }

    /// The same store with another binding grace (at least the TTL): how long a URL stays
    /// bound to its id after the entry expired or was deregistered. For tests.
    pub fn with_binding_grace(self, grace: Duration) -> Self {
        self.lock().grace = grace.max(self.ttl);
        self
    }

    /// Total entries held in the indexes, live or not yet swept; for tests of index cleanup.
    pub fn index_len(&self) -> usize {
        let inner = self.lock();
        inner.entries.len()
            + inner.by_url.len()
            + inner.by_name.values().map(BTreeSet::len).sum::<usize>()
    }

    /// The same store keeping only the last `len` (≥ 1) changes; for tests of gaps.
    pub fn with_change_log_len(self, len: usize) -> Self {
        self.lock().log.capacity = len.max(1);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // breaks later operations (each mutation is a handful of infallible inserts), so a
        // poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// The live entry for `id`; an expired one is removed on the way.
    fn live(&mut self, id: Ulid, now: Instant) -> Option<&mut Entry> {
        let expired = self.entries.get(&id).is_some_and(|e| e.deadline <= now);
        if expired {
            self.expire(id);
        }
        self.entries.get_mut(&id)
    }

    /// Removes an expired entry and logs `Expired`; its URL stays bound to its id for the
    /// grace period.
    fn expire(&mut self, id: Ulid) {
        let Some(deadline) = self.entries.get(&id).map(|e| e.deadline) else {
            return;
        };
        if let Some(record) = self.remove(id) {
            let until = deadline + self.grace;
            self.expired.insert(record.url.clone(), (id, until));
            self.log.push(ChangeKind::Expired, record);
        }
    }

    /// Removes an entry from every index; logs nothing (the caller says why it went).
    fn remove(&mut self, id: Ulid) -> Option<Arc<ServiceRecord>> {
        let entry = self.entries.remove(&id)?;
        self.deadlines.remove(&(entry.deadline, id));
        let record = entry.record.0;
        if self.by_url.get(&record.url) == Some(&id) {
            self.by_url.remove(&record.url);
        }
        self.unindex_name(&record.info.display_name, id);
        Some(record)
    }

    /// Moves `id`'s deadline in the deadline index.
    fn reschedule(&mut self, id: Ulid, old: Instant, new: Instant) {
        self.deadlines.remove(&(old, id));
        self.deadlines.insert((new, id));
    }

    /// Expires every entry whose deadline is at or before `now`; returns how many.
    fn expire_due(&mut self, now: Instant) -> usize {
        let mut expired = 0;
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            if self.entries.contains_key(&id) {
                self.expire(id);
                expired += 1;
            } else {
                // Cannot happen (removal drops the index entry), but must not loop for ever.
                self.deadlines.remove(&(deadline, id));
            }
        }
        expired
    }

    fn unindex_name(&mut self, name: &str, id: Ulid) {
        if let Some(ids) = self.by_name.get_mut(name) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_name.remove(name);
            }
        }
    }
}

/// A listing of the memory store: the id after which the next page starts; the lock is held
/// only while a page is taken, [`SCAN_STEP`] index entries at a time.
pub struct MemoryListing {
    store: MemoryStore,
    filter: ListFilter,
    /// The last id examined.
    after: Option<Ulid>,
    done: bool,
}

impl MemoryListing {
    /// Examines at most [`SCAN_STEP`] candidates after `self.after` under one hold of the lock,
    /// adding live matches to `page` until it holds `limit`.
    fn scan(&mut self, limit: usize, page: &mut Vec<Arc<ServiceRecord>>) {
        let now = Instant::now();
        let inner = self.store.lock();
        let filter = &self.filter;
        let after = self.after;
        let range = (
            after.map_or(Bound::Unbounded, Bound::Excluded),
            Bound::Unbounded,
        );
        let candidates: Box<dyn Iterator<Item = Ulid> + '_> = if let Some(url) = &filter.url {
            let id = inner.by_url.get(url).copied();
            Box::new(id.filter(|id| after.is_none_or(|a| *id > a)).into_iter())
        } else if let Some(name) = &filter.display_name {
            match inner.by_name.get(name) {
                Some(ids) => Box::new(ids.range(range).copied()),
                None => Box::new(std::iter::empty()),
            }
        } else {
            Box::new(inner.entries.range(range).map(|(id, _)| *id))
        };
        let mut last = after;
        let mut done = true;
        for (examined, id) in candidates.enumerate() {
            if examined == SCAN_STEP || page.len() == limit {
                done = false;
                break;
            }
            last = Some(id);
            let entry = inner.entries.get(&id);
            if let Some(e) = entry.filter(|e| e.deadline > now && filter.matches(&e.record)) {
                page.push(e.record.0.clone());
            }
        }
        drop(inner);
        self.after = last;
        self.done = done;
    }
}

impl Listing for MemoryListing {
    async fn next_page(&mut self, limit: usize) -> Result<Vec<Arc<ServiceRecord>>, StoreError> {
        let mut page = Vec::new();
        while !self.done && page.len() < limit {
            if !page.is_empty() || self.after.is_some() {
                // Between two holds of the lock, let waiting pings on this thread run.
                tokio::task::yield_now().await;
            }
            self.scan(limit, &mut page);
        }
        Ok(page)
    }
}

impl Store for MemoryStore {
    type Listing = MemoryListing;

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn register_as(
        &self,
        reg: Registration,
        access: Access,
        new_lease: Option<LeaseHash>,
    ) -> Result<Registered, StoreError> {
        let now = Instant::now();
        let stamp = Timestamp::now();
        let expires_at = stamp.saturating_add(self.ttl);
        let mut inner = self.lock();

        let existing = inner.by_url.get(&reg.url).copied();
        let existing = existing.filter(|id| inner.live(*id, now).is_some());
        if let Some(id) = existing {
            let Some(entry) = inner.entries.get_mut(&id) else {
                return Err(StoreError::Corrupt(format!(
                    "url index points to missing {id}"
                )));
            };
            let lease = LeaseOutcome::decide(entry.lease.as_ref(), access, new_lease.as_ref())?;
            if lease == LeaseOutcome::New {
                entry.lease = new_lease;
            }
            let old_name = std::mem::replace(&mut entry.record.info, reg.info).display_name;
            // The health a check found belongs to it: another check (or none) starts afresh.
            if entry.record.check != reg.check {
                entry.record.health = Health::default();
                entry.record.check = reg.check;
            }
            entry.record.last_updated = stamp;
            entry.record.last_ping_at = stamp;
            entry.record.expires_at = expires_at;
            let old_deadline = std::mem::replace(&mut entry.deadline, now + self.ttl);
            let record = entry.record.clone();
            let shared = entry.record.0.clone();
            inner.reschedule(id, old_deadline, now + self.ttl);
            if old_name != record.info.display_name {
                inner.unindex_name(&old_name, id);
                inner
                    .by_name
                    .entry(record.info.display_name.clone())
                    .or_default()
                    .insert(id);
            }
            inner.log.push(ChangeKind::Updated, shared);
            return Ok(Registered {
                record,
                created: false,
                lease,
            });
        }

        let lease = LeaseOutcome::decide(None, access, new_lease.as_ref())?;
        // The id still bound to this URL, else the requested one if its tombstone names this
        // URL (see the store module docs); never one bound to another URL.
        let bound = inner
            .expired
            .remove(&reg.url)
            .filter(|(_, until)| *until > now)
            .map(|(id, _)| id);
        let claimed = reg.requested_id.filter(|id| {
            inner
                .tombstones
                .get(id)
                .is_some_and(|(url, until)| *url == reg.url && *until > now)
        });
        let id = match bound.or(claimed) {
            Some(id) if inner.live(id, now).is_none() => id,
            _ => mint_id(&reg.url),
        };
        inner.tombstones.remove(&id);
        let record = ServiceRecord {
            id,
            url: reg.url,
            info: reg.info,
            registered_at: stamp,
            last_updated: stamp,
            last_ping_at: stamp,
            expires_at,
            health: Health::default(),
            check: reg.check,
        };
        inner.by_url.insert(record.url.clone(), id);
        inner
            .by_name
            .entry(record.info.display_name.clone())
            .or_default()
            .insert(id);
        let shared = Arc::new(record.clone());
        inner.entries.insert(
            id,
            Entry {
                record: Shared(shared.clone()),
                deadline: now + self.ttl,
                lease: new_lease.filter(|_| lease == LeaseOutcome::New),
            },
        );
        inner.deadlines.insert((now + self.ttl, id));
        inner.log.push(ChangeKind::Registered, shared);
        Ok(Registered {
            record,
            created: true,
            lease,
        })
    }

    async fn ping_as(&self, id: Ulid, access: Access) -> Result<Option<Pinged>, StoreError> {
        let now = Instant::now();
        let stamp = Timestamp::now();
        let ttl = self.ttl;
        let mut inner = self.lock();
        let Some(entry) = inner.live(id, now) else {
            return Ok(None);
        };
        LeaseOutcome::decide(entry.lease.as_ref(), access, None)?;
        let old_deadline = std::mem::replace(&mut entry.deadline, now + ttl);
        entry.record.last_ping_at = stamp;
        entry.record.expires_at = stamp.saturating_add(ttl);
        let expires_at = entry.record.expires_at;
        inner.reschedule(id, old_deadline, now + ttl);
        Ok(Some(Pinged {
            id,
            last_ping_at: stamp,
            expires_at,
        }))
    }

    async fn set_health(
        &self,
        id: Ulid,
        health: Health,
        access: Access,
    ) -> Result<Option<HealthSet>, StoreError> {
        let mut inner = self.lock();
        let Some(entry) = inner.live(id, Instant::now()) else {
            return Ok(None);
        };
        LeaseOutcome::decide(entry.lease.as_ref(), access, None)?;
        let old = &entry.record.health;
        if old.status == health.status && old.output == health.output {
            // Nothing new: `checked_at` stays when the status or output was last set.
            return Ok(Some(HealthSet {
                record: entry.record.clone(),
                changed: false,
            }));
        }
        let changed = old.status != health.status;
        entry.record.health = health;
        let record = entry.record.clone();
        let shared = entry.record.0.clone();
        if changed {
            inner.log.push(ChangeKind::Updated, shared);
        }
        Ok(Some(HealthSet { record, changed }))
    }

    async fn checkers(&self, replica: &str, ttl: Duration) -> Result<Vec<String>, StoreError> {
        // One process holds the store, so normally it is the only checker; clones of the
        // store (tests) still see each other, as replicas on one Valkey do.
        checker_replica_ok(replica, ttl)?;
        let now = Instant::now();
        let mut inner = self.lock();
        inner.checkers.retain(|_, deadline| *deadline > now);
        // At most MAX_CHECKER_TTL (checked above): no overflow.
        inner.checkers.insert(replica.to_owned(), now + ttl);
        let mut live: Vec<String> = inner.checkers.keys().cloned().collect();
        live.sort();
        Ok(live)
    }

    async fn get(&self, id: Ulid) -> Result<Option<ServiceRecord>, StoreError> {
        let mut inner = self.lock();
        Ok(inner.live(id, Instant::now()).map(|e| e.record.clone()))
    }

    async fn listing(
        &self,
        filter: ListFilter,
        after: Option<Ulid>,
    ) -> Result<MemoryListing, StoreError> {
        Ok(MemoryListing {
            store: self.clone(),
            filter,
            after,
            done: false,
        })
    }

    async fn deregister_as(
        &self,
        id: Ulid,
        access: Access,
    ) -> Result<Option<ServiceRecord>, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let Some(entry) = inner.live(id, now) else {
            return Ok(None);
        };
        LeaseOutcome::decide(entry.lease.as_ref(), access, None)?;
        let Some(record) = inner.remove(id) else {
            return Ok(None);
        };
        let until = now + inner.grace;
        inner.tombstones.insert(id, (record.url.clone(), until));
        inner.log.push(ChangeKind::Deregistered, record.clone());
        Ok(Some(Arc::unwrap_or_clone(record)))
    }

    async fn sweep(&self) -> Result<usize, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let dead = inner.expire_due(now);
        inner.expired.retain(|_, (_, until)| *until > now);
        inner.tombstones.retain(|_, (_, until)| *until > now);
        Ok(dead)
    }

    async fn health(&self) -> Result<StoreHealth, StoreError> {
        let start = Instant::now();
        drop(self.lock());
        // Always writable: memory is checked by the limits on registrations, not here.
        Ok(StoreHealth {
            kind: "memory",
            latency: start.elapsed(),
            write_refused: None,
            cluster: None,
        })
    }

    async fn change_head(&self) -> Result<Cursor, StoreError> {
        Ok(self.lock().log.head)
    }

    async fn changes(
        &self,
        after: Cursor,
        limit: usize,
        wait: Duration,
    ) -> Result<Changes, StoreError> {
        let limit = limit.max(1);
        let deadline = Instant::now() + wait;
        let notify = self.lock().log.notify.clone();
        loop {
            // Registered before looking, so a change logged in between still wakes us.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.lock().log.after(after, limit) {
                None => return Ok(Changes::Gap),
                Some(batch) if !batch.is_empty() => return Ok(Changes::Changes(batch)),
                Some(_) => {}
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Changes::Changes(Vec::new()));
            }
        }
    }

    async fn reap(&self) -> Result<usize, StoreError> {
        Ok(self.lock().expire_due(Instant::now()))
    }

    async fn count(&self) -> Result<u64, StoreError> {
        Ok(u64::try_from(self.lock().entries.len()).unwrap_or(u64::MAX))
    }
}

/// Expiry on tokio's paused clock: exact instants, no real sleeps. The contract suite
/// (`tests/store_contract.rs`) covers the rest of the behaviour.
#[cfg(test)]
mod tests {
    use super::*;
    use servicekit::protocol::ServiceInfo;
    use tokio::time::advance;

    const TTL: Duration = Duration::from_secs(30);
    const MS: Duration = Duration::from_millis(1);

    fn reg(url: &str, name: &str) -> Registration {
        Registration {
            url: url.to_owned(),
            info: ServiceInfo::new(name),
            requested_id: None,
            check: None,
        }
    }

    async fn register(s: &MemoryStore, url: &str, name: &str) -> Ulid {
        s.register(reg(url, name))
            .await
            .expect("register")
            .record
            .id
    }

    async fn live(s: &MemoryStore, id: Ulid) -> bool {
        s.get(id).await.expect("get").is_some()
    }

    async fn listed(s: &MemoryStore, filter: &ListFilter) -> Vec<Ulid> {
        let records = s.list(filter).await.expect("list");
        records.iter().map(|r| r.id).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_lives_exactly_its_ttl() {
        let s = MemoryStore::new(TTL);
        let id = register(&s, "http://a:1", "A").await;
        advance(TTL - MS).await;
        assert!(live(&s, id).await, "live just before its TTL");
        assert_eq!(listed(&s, &ListFilter::default()).await, vec![id]);
        advance(MS).await;
        assert!(!live(&s, id).await, "gone at its TTL");
        assert!(s.deregister(id).await.expect("deregister").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn ping_and_reregister_extend_life() {
        let s = MemoryStore::new(TTL);
        let pinged = register(&s, "http://a:1", "A").await;
        let reregistered = register(&s, "http://b:1", "B").await;
        advance(TTL - MS).await;
        assert!(s.ping(pinged).await.expect("ping").is_some());
        assert_eq!(register(&s, "http://b:1", "B").await, reregistered);
        // Past the first deadline, before the renewed one.
        advance(TTL - MS).await;
        assert!(live(&s, pinged).await, "ping restarted the TTL");
        assert!(
            live(&s, reregistered).await,
            "registration restarted the TTL"
        );
        advance(MS).await;
        assert!(!live(&s, pinged).await, "gone a TTL after the ping");
        assert!(
            !live(&s, reregistered).await,
            "gone a TTL after re-registering"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ping_never_resurrects_an_expired_entry() {
        let s = MemoryStore::new(TTL);
        let id = register(&s, "http://a:1", "A").await;
        advance(TTL).await;
        // Nothing read it since it expired: the ping is the first to look.
        assert!(s.ping(id).await.expect("ping").is_none());
        assert!(s.ping(id).await.expect("ping again").is_none());
        assert!(!live(&s, id).await);
        assert_eq!(
            s.index_len(),
            0,
            "the expired entry was dropped, not renewed"
        );
        assert!(
            s.register(reg("http://a:1", "A"))
                .await
                .expect("register")
                .created
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_drops_only_expired_entries() {
        let s = MemoryStore::new(TTL);
        let old = register(&s, "http://old:1", "O").await;
        register(&s, "http://old:2", "O").await;
        advance(TTL / 2).await;
        let young = register(&s, "http://young:1", "Y").await;
        assert_eq!(s.sweep().await.expect("sweep"), 0, "nothing expired yet");
        assert_eq!(s.index_len(), 9);
        advance(TTL - TTL / 2 - MS).await;
        assert_eq!(
            s.sweep().await.expect("sweep"),
            0,
            "one ms before the deadline"
        );
        advance(MS).await;
        assert_eq!(s.sweep().await.expect("sweep"), 2);
        assert_eq!(s.index_len(), 3, "only the young entry stays indexed");
        assert!(!live(&s, old).await);
        assert!(live(&s, young).await);
        assert_eq!(s.sweep().await.expect("sweep again"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn bindings_and_tombstones_last_the_grace_and_sweep_frees_them() {
        let s = MemoryStore::new(TTL);
        let grace = super::super::binding_grace(TTL);
        let expiring = register(&s, "http://a:1", "A").await;
        advance(TTL).await;
        // Expired just now; deregistered just now: both bound until now + grace.
        let deleted = register(&s, "http://b:1", "B").await;
        s.deregister(deleted)
            .await
            .expect("deregister")
            .expect("existed");
        assert_eq!(s.sweep().await.expect("sweep"), 1);
        let held = |s: &MemoryStore| {
            let inner = s.lock();
            (inner.expired.len(), inner.tombstones.len())
        };
        assert_eq!(held(&s), (1, 1), "both bindings held through the grace");
        advance(grace - MS).await;
        assert_eq!(s.sweep().await.expect("sweep"), 0);
        assert_eq!(held(&s), (1, 1));
        advance(MS).await;
        s.sweep().await.expect("sweep");
        assert_eq!(held(&s), (0, 0), "the sweep frees them after the grace");
        let again = s
            .register(Registration {
                requested_id: Some(expiring),
                ..reg("http://a:1", "A")
            })
            .await
            .expect("register");
        assert_ne!(again.record.id, expiring, "a new id after the grace");
    }

    #[tokio::test(start_paused = true)]
    async fn list_skips_expired_entries_before_any_sweep() {
        let s = MemoryStore::new(TTL);
        let dying = register(&s, "http://dying:1", "D").await;
        advance(TTL / 2).await;
        let living = register(&s, "http://living:1", "L").await;
        advance(TTL - TTL / 2).await;
        let by_name = |name: &str| ListFilter {
            display_name: Some(name.to_owned()),
            ..ListFilter::default()
        };
        let by_url = |url: &str| ListFilter {
            url: Some(url.to_owned()),
            ..ListFilter::default()
        };
        assert_eq!(listed(&s, &ListFilter::default()).await, vec![living]);
        assert!(listed(&s, &by_name("D")).await.is_empty());
        assert!(listed(&s, &by_url("http://dying:1")).await.is_empty());
        assert_eq!(listed(&s, &by_name("L")).await, vec![living]);
        assert_eq!(
            s.index_len(),
            6,
            "list skipped the dead entry; only sweep frees it"
        );
        assert_eq!(s.sweep().await.expect("sweep"), 1);
        assert!(!live(&s, dying).await);
    }

    /// Every change after `after`, waiting for none.
    async fn log_after(s: &MemoryStore, after: Cursor) -> Vec<(ChangeKind, Ulid, Cursor)> {
        match s
            .changes(after, 1000, Duration::ZERO)
            .await
            .expect("changes")
        {
            Changes::Changes(batch) => batch
                .iter()
                .map(|c| (c.kind, c.subject.id(), c.cursor))
                .collect(),
            Changes::Gap => panic!("a gap after {after}"),
        }
    }

    fn kinds(log: &[(ChangeKind, Ulid, Cursor)]) -> Vec<(ChangeKind, Ulid)> {
        log.iter().map(|(k, id, _)| (*k, *id)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn every_write_is_logged_in_order_under_increasing_cursors() {
        use ChangeKind::*;
        let s = MemoryStore::new(TTL);
        assert_eq!(s.change_head().await.expect("head"), Cursor::ZERO);
        let a = register(&s, "http://a:1", "A").await;
        let b = register(&s, "http://b:1", "B").await;
        register(&s, "http://a:1", "A2").await;
        s.ping(b).await.expect("ping");
        s.deregister(b).await.expect("deregister");
        let log = log_after(&s, Cursor::ZERO).await;
        assert_eq!(
            kinds(&log),
            vec![
                (Registered, a),
                (Registered, b),
                (Updated, a),
                (Deregistered, b)
            ],
            "a ping is not a change"
        );
        assert!(log.windows(2).all(|w| w[0].2 < w[1].2), "{log:?}");
        assert_eq!(s.change_head().await.expect("head"), log[3].2);
        assert_eq!(kinds(&log_after(&s, log[1].2).await)[0], (Updated, a));
        assert!(log_after(&s, log[3].2).await.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn reap_logs_each_expiry_once_within_the_reap_interval() {
        use ChangeKind::*;
        let s = MemoryStore::new(TTL);
        let a = register(&s, "http://a:1", "A").await;
        advance(TTL / 2).await;
        let b = register(&s, "http://b:1", "B").await;
        let start = s.change_head().await.expect("head");
        advance(TTL / 2 - MS).await;
        assert_eq!(s.reap().await.expect("reap"), 0, "not due yet");
        // The orchestrator reaps every REAP_INTERVAL: the next reap after the deadline
        // logs the expiry.
        advance(super::super::REAP_INTERVAL).await;
        assert_eq!(s.reap().await.expect("reap"), 1);
        assert_eq!(kinds(&log_after(&s, start).await), vec![(Expired, a)]);
        // Nothing removes it twice: not a read, not a sweep, not another reap.
        assert!(!live(&s, a).await);
        assert_eq!(s.sweep().await.expect("sweep"), 0);
        assert_eq!(s.reap().await.expect("reap"), 0);
        assert_eq!(log_after(&s, start).await.len(), 1);
        // A read that finds an entry dead before any reap logs it, once.
        advance(TTL).await;
        assert!(!live(&s, b).await);
        assert_eq!(s.reap().await.expect("reap"), 0);
        assert_eq!(s.sweep().await.expect("sweep"), 0);
        assert_eq!(
            kinds(&log_after(&s, start).await),
            vec![(Expired, a), (Expired, b)]
        );
        assert_eq!(s.lock().deadlines.len(), 0, "the deadline index shrank too");
    }

    #[tokio::test(start_paused = true)]
    async fn reap_follows_pings_in_the_deadline_index() {
        let s = MemoryStore::new(TTL);
        let a = register(&s, "http://a:1", "A").await;
        advance(TTL - MS).await;
        s.ping(a).await.expect("ping").expect("live");
        advance(MS).await;
        assert_eq!(
            s.reap().await.expect("reap"),
            0,
            "the ping moved the deadline"
        );
        assert_eq!(s.lock().deadlines.len(), 1);
        advance(TTL).await;
        assert_eq!(s.reap().await.expect("reap"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_behind_the_ring_or_beyond_the_head_gets_a_gap() {
        let s = MemoryStore::new(TTL).with_change_log_len(3);
        let first = register(&s, "http://a:1", "A").await;
        let log = log_after(&s, Cursor::ZERO).await;
        let oldest = log[0].2;
        for _ in 0..3 {
            register(&s, "http://a:1", "A").await;
        }
        // The first change was dropped: a reader at ZERO missed it, one at it did not.
        assert_eq!(
            s.changes(Cursor::ZERO, 10, Duration::ZERO)
                .await
                .expect("changes"),
            Changes::Gap
        );
        assert_eq!(log_after(&s, oldest).await.len(), 3);
        let head = s.change_head().await.expect("head");
        let beyond = Cursor {
            ms: head.ms,
            seq: head.seq + 1,
        };
        assert_eq!(
            s.changes(beyond, 10, Duration::ZERO)
                .await
                .expect("changes"),
            Changes::Gap
        );
        assert!(live(&s, first).await);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_waits_for_the_next_change_or_its_wait() {
        let s = MemoryStore::new(TTL);
        let head = s.change_head().await.expect("head");
        let started = Instant::now();
        assert_eq!(
            s.changes(head, 10, Duration::from_secs(1))
                .await
                .expect("changes"),
            Changes::Changes(Vec::new())
        );
        assert_eq!(started.elapsed(), Duration::from_secs(1), "waited its wait");
        let reader = {
            let s = s.clone();
            tokio::spawn(async move { s.changes(head, 10, Duration::from_secs(60)).await })
        };
        tokio::task::yield_now().await;
        let id = register(&s, "http://a:1", "A").await;
        let got = reader.await.expect("joined").expect("changes");
        let Changes::Changes(batch) = got else {
            panic!("gap")
        };
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].subject.id(), id);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "woken, not timed out"
        );
    }
}
