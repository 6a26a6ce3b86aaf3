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
//! Deadlines are [`tokio::time::Instant`]s, so expiry follows tokio's clock and can be tested
//! on paused time; the timestamps shown in records still come from the wall clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::{Bound, Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use servicekit::protocol::{ServiceRecord, Timestamp};
use tokio::time::Instant;
use ulid::Ulid;

use super::{
    mint_id, Access, LeaseHash, LeaseOutcome, ListFilter, Listing, Pinged, Registered,
    Registration, Store, StoreError, StoreHealth,
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

    /// Removes an expired entry; its URL stays bound to its id for the grace period.
    fn expire(&mut self, id: Ulid) {
        let Some(deadline) = self.entries.get(&id).map(|e| e.deadline) else {
            return;
        };
        if let Some(record) = self.remove(id) {
            let until = deadline + self.grace;
            self.expired.insert(record.url, (id, until));
        }
    }

    fn remove(&mut self, id: Ulid) -> Option<ServiceRecord> {
        let entry = self.entries.remove(&id)?;
        let record = Arc::unwrap_or_clone(entry.record.0);
        if self.by_url.get(&record.url) == Some(&id) {
            self.by_url.remove(&record.url);
        }
        self.unindex_name(&record.info.display_name, id);
        Some(record)
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
            entry.record.last_updated = stamp;
            entry.record.last_ping_at = stamp;
            entry.record.expires_at = expires_at;
            entry.deadline = now + self.ttl;
            let record = entry.record.clone();
            if old_name != record.info.display_name {
                inner.unindex_name(&old_name, id);
                inner
                    .by_name
                    .entry(record.info.display_name.clone())
                    .or_default()
                    .insert(id);
            }
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
        };
        inner.by_url.insert(record.url.clone(), id);
        inner
            .by_name
            .entry(record.info.display_name.clone())
            .or_default()
            .insert(id);
        inner.entries.insert(
            id,
            Entry {
                record: Shared(Arc::new(record.clone())),
                deadline: now + self.ttl,
                lease: new_lease.filter(|_| lease == LeaseOutcome::New),
            },
        );
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
        entry.deadline = now + ttl;
        entry.record.last_ping_at = stamp;
        entry.record.expires_at = stamp.saturating_add(ttl);
        Ok(Some(Pinged {
            id,
            last_ping_at: stamp,
            expires_at: entry.record.expires_at,
        }))
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
        let record = inner.remove(id);
        if let Some(record) = &record {
            let until = now + inner.grace;
            inner.tombstones.insert(id, (record.url.clone(), until));
        }
        Ok(record)
    }

    async fn sweep(&self) -> Result<usize, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let dead: Vec<Ulid> = inner
            .entries
            .iter()
            .filter(|(_, e)| e.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &dead {
            inner.expire(*id);
        }
        inner.expired.retain(|_, (_, until)| *until > now);
        inner.tombstones.retain(|_, (_, until)| *until > now);
        Ok(dead.len())
    }

    async fn health(&self) -> Result<StoreHealth, StoreError> {
        let start = Instant::now();
        drop(self.lock());
        // Always writable: memory is checked by the limits on registrations, not here.
        Ok(StoreHealth {
            kind: "memory",
            latency: start.elapsed(),
            write_refused: None,
        })
    }

    async fn change_head(&self) -> Result<super::Cursor, StoreError> {
        Err(StoreError::Unavailable(
            "the change log is not built yet".into(),
        ))
    }

    async fn changes(
        &self,
        _after: super::Cursor,
        _limit: usize,
        _wait: Duration,
    ) -> Result<super::Changes, StoreError> {
        Err(StoreError::Unavailable(
            "the change log is not built yet".into(),
        ))
    }

    async fn reap(&self) -> Result<usize, StoreError> {
        Err(StoreError::Unavailable(
            "the change log is not built yet".into(),
        ))
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
}
