//! The embedded store: registrations in this process's memory.
//!
//! It is the zero-setup default, so `orchestrator` runs with nothing else installed. It gives
//! the same guarantees as the Valkey store within one process: one mutex makes every operation
//! atomic, expiry is checked on every read (an expired entry is gone the instant its deadline
//! passes, whether or not it was swept), and [`Store::sweep`] frees the memory of expired
//! entries. State is lost when the process exits; run several orchestrators on Valkey instead.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use servicekit::protocol::{ServiceRecord, Timestamp};
use ulid::Ulid;

use super::{
    id_fits_url, mint_id, ListFilter, Pinged, Registered, Registration, Store, StoreError,
    StoreHealth,
};

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
}

struct Entry {
    record: ServiceRecord,
    deadline: Instant,
}

impl MemoryStore {
    /// An empty store whose entries live `ttl` after their last registration or ping.
    pub fn new(ttl: Duration) -> Self {
        MemoryStore {
            ttl,
            inner: Arc::new(Mutex::new(Inner::default())),
        }
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
            self.remove(id);
        }
        self.entries.get_mut(&id)
    }

    fn remove(&mut self, id: Ulid) -> Option<ServiceRecord> {
        let entry = self.entries.remove(&id)?;
        let record = entry.record;
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

impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn register(&self, reg: Registration) -> Result<Registered, StoreError> {
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
            });
        }

        let requested = reg
            .requested_id
            .filter(|id| id_fits_url(*id, &reg.url) && inner.live(*id, now).is_none());
        let id = requested.unwrap_or_else(|| mint_id(&reg.url));
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
                record: record.clone(),
                deadline: now + self.ttl,
            },
        );
        Ok(Registered {
            record,
            created: true,
        })
    }

    async fn ping(&self, id: Ulid) -> Result<Option<Pinged>, StoreError> {
        let now = Instant::now();
        let stamp = Timestamp::now();
        let ttl = self.ttl;
        let mut inner = self.lock();
        Ok(inner.live(id, now).map(|entry| {
            entry.deadline = now + ttl;
            entry.record.last_ping_at = stamp;
            entry.record.expires_at = stamp.saturating_add(ttl);
            Pinged {
                id,
                last_ping_at: stamp,
                expires_at: entry.record.expires_at,
            }
        }))
    }

    async fn get(&self, id: Ulid) -> Result<Option<ServiceRecord>, StoreError> {
        let mut inner = self.lock();
        Ok(inner.live(id, Instant::now()).map(|e| e.record.clone()))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<ServiceRecord>, StoreError> {
        let now = Instant::now();
        let inner = self.lock();
        let live = |id: &Ulid| {
            inner
                .entries
                .get(id)
                .filter(|e| e.deadline > now)
                .map(|e| &e.record)
        };
        let candidates: Vec<&ServiceRecord> = if let Some(url) = &filter.url {
            inner.by_url.get(url).and_then(live).into_iter().collect()
        } else if let Some(name) = &filter.display_name {
            inner
                .by_name
                .get(name)
                .into_iter()
                .flatten()
                .filter_map(live)
                .collect()
        } else {
            inner.entries.keys().filter_map(live).collect()
        };
        let mut out: Vec<ServiceRecord> = candidates
            .into_iter()
            .filter(|r| filter.matches(r))
            .cloned()
            .collect();
        out.sort_by_key(|r| r.id);
        Ok(out)
    }

    async fn deregister(&self, id: Ulid) -> Result<Option<ServiceRecord>, StoreError> {
        let mut inner = self.lock();
        if inner.live(id, Instant::now()).is_none() {
            return Ok(None);
        }
        Ok(inner.remove(id))
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
            inner.remove(*id);
        }
        Ok(dead.len())
    }

    async fn health(&self) -> Result<StoreHealth, StoreError> {
        let start = Instant::now();
        drop(self.lock());
        Ok(StoreHealth {
            kind: "memory",
            latency: start.elapsed(),
        })
    }
}
