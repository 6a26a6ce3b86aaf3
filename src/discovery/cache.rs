//! The watcher's cache: the current instances, and the ordered updates its subscribers follow.
//!
//! Every change happens under one lock together with its broadcast, so a subscriber that takes
//! the map and its receiver under the same lock misses nothing and sees nothing twice.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::broadcast;
use ulid::Ulid;

use super::Instance;

/// One change of the cache, as broadcast to subscribers.
#[derive(Debug, Clone)]
pub(crate) enum Update {
    /// A new instance, or a new record for a known one.
    Upsert(Instance),
    /// An instance left.
    Remove(Ulid),
}

/// What a snapshot changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Diff {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
}

pub(crate) struct Cache {
    map: Mutex<HashMap<Ulid, Instance>>,
    tx: broadcast::Sender<Update>,
}

impl Cache {
    /// A cache whose subscribers may fall `capacity` updates behind before they re-diff.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Cache {
            map: Mutex::new(HashMap::new()),
            tx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Ulid, Instance>> {
        // A panic while holding the lock cannot leave the map half-changed (every change is
        // one insert or remove), so a poisoned lock is still a consistent map.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current instances, in id (registration) order.
    pub fn instances(&self) -> Vec<Instance> {
        let mut all: Vec<Instance> = self.lock().values().cloned().collect();
        all.sort_by_key(|i| i.id);
        all
    }

    /// The current map and a receiver of every later update.
    pub fn subscribe(&self) -> (HashMap<Ulid, Instance>, broadcast::Receiver<Update>) {
        let map = self.lock();
        (map.clone(), self.tx.subscribe())
    }

    /// Inserts or replaces one instance; whether anything changed.
    pub fn upsert(&self, instance: Instance) -> bool {
        let mut map = self.lock();
        upsert(&mut map, &self.tx, instance)
    }

    /// Removes one instance; whether it was there.
    pub fn remove(&self, id: Ulid) -> bool {
        let mut map = self.lock();
        let known = map.remove(&id).is_some();
        if known {
            let _ = self.tx.send(Update::Remove(id));
        }
        known
    }

    /// Replaces everything with a snapshot, broadcasting only the differences.
    pub fn replace(&self, new: HashMap<Ulid, Instance>) -> Diff {
        let mut map = self.lock();
        let mut diff = Diff::default();
        let gone: Vec<Ulid> = map
            .keys()
            .filter(|id| !new.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            map.remove(&id);
            diff.removed += 1;
            let _ = self.tx.send(Update::Remove(id));
        }
        for (_, instance) in new {
            let known = map.contains_key(&instance.id);
            if upsert(&mut map, &self.tx, instance) {
                if known {
                    diff.changed += 1;
                } else {
                    diff.added += 1;
                }
            }
        }
        diff
    }
}

fn upsert(
    map: &mut HashMap<Ulid, Instance>,
    tx: &broadcast::Sender<Update>,
    instance: Instance,
) -> bool {
    if let Some(known) = map.get_mut(&instance.id) {
        if known.same_registration(&instance) {
            // Only its pings moved: keep the newer record, tell nobody.
            *known = instance;
            return false;
        }
    }
    map.insert(instance.id, instance.clone());
    let _ = tx.send(Update::Upsert(instance));
    true
}

/// The updates that turn `from` into `to`: removals first, then inserts of new or changed
/// instances (changed: [`Instance::same_registration`] does not hold).
pub(crate) fn diff(from: &HashMap<Ulid, Instance>, to: &HashMap<Ulid, Instance>) -> Vec<Update> {
    let mut out: Vec<Update> = from
        .keys()
        .filter(|id| !to.contains_key(id))
        .map(|id| Update::Remove(*id))
        .collect();
    let mut changed: Vec<&Instance> = to
        .values()
        .filter(|i| from.get(&i.id).is_none_or(|f| !f.same_registration(i)))
        .collect();
    changed.sort_by_key(|i| i.id);
    out.extend(changed.into_iter().cloned().map(Update::Upsert));
    out
}
