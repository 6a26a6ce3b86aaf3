//! Listing: pages of records in id order, read from one snapshot of an index.
//!
//! The indexes are sorted sets scored by expiry, not by id, and a score moves whenever an
//! entry is renewed or swept, so paging by score would return entries twice or skip them. A
//! listing instead reads the ids of its index once (one `ZRANGE`; every record live at that
//! instant is in it, by the index rule in `docs/valkey-store.md`), sorts them, and fetches
//! the records one page at a time (one pipelined round trip of `GET`s). What a listing keeps
//! is 32 bytes per index entry; the records themselves are only ever held a page at a time.
//! The price is that every listing, and so every `?limit=` page, reads its index's ids once.

use std::sync::Arc;

use fred::interfaces::{KeysInterface, SortedSetsInterface};
use fred::types::Value;
use servicekit::protocol::ServiceRecord;
use ulid::Ulid;

use super::index::BATCH;
use super::record::record_from_value;
use super::ValkeyStore;
use crate::store::{ListFilter, Listing, StoreError};

/// A listing of the Valkey store: the candidate ids still to examine, in id order.
pub struct ValkeyListing {
    store: ValkeyStore,
    filter: ListFilter,
    /// The index the candidates came from, so dead members can be dropped from it; `None` for
    /// a lookup by URL.
    index: Option<String>,
    /// Candidates and their index scores (for the conditional drop), in id order.
    candidates: Vec<(Ulid, f64)>,
    /// How many of `candidates` were examined.
    next: usize,
}

impl ValkeyStore {
    /// Starts a listing: reads the candidate ids (by URL, by display name, or all) after `after`.
    pub(super) async fn open_listing(
        &self,
        filter: ListFilter,
        after: Option<Ulid>,
    ) -> Result<ValkeyListing, StoreError> {
        let (index, mut candidates) = if let Some(url) = &filter.url {
            let key = self.keys.url(url);
            let id: Option<String> = self.read(|| self.client.get(&key)).await?;
            let id = id.as_deref().and_then(|s| Ulid::from_string(s).ok());
            (None, id.map(|id| (id, 0.0)).into_iter().collect())
        } else {
            let index = match &filter.display_name {
                Some(name) => self.keys.name_idx(name),
                None => self.keys.all_idx(),
            };
            let candidates = self.read_ids(&index).await?;
            (Some(index), candidates)
        };
        candidates.sort_unstable_by_key(|(id, _)| *id);
        if let Some(after) = after {
            let start = candidates.partition_point(|(id, _)| *id <= after);
            candidates.drain(..start);
        }
        Ok(ValkeyListing {
            store: self.clone(),
            filter,
            index,
            candidates,
            next: 0,
        })
    }

    /// The members of `index` that are ids, with their scores. Members that are not ids are
    /// not ours to interpret: they are dropped in the background so they cannot pile up.
    async fn read_ids(&self, index: &str) -> Result<Vec<(Ulid, f64)>, StoreError> {
        let entries: Vec<(String, f64)> = self
            .read(|| self.client.zrange(index, 0, -1, None, false, None, true))
            .await?;
        let mut ids = Vec::with_capacity(entries.len());
        let mut junk = Vec::new();
        for (member, score) in entries {
            match Ulid::from_string(&member) {
                Ok(id) => ids.push((id, score)),
                Err(_) => junk.push((member, score)),
            }
        }
        self.drop_in_background(index, junk);
        Ok(ids)
    }

    /// Drops dead (member, score) pairs from `index` without waiting: cleanup on read is best
    /// effort and the listing is already correct without it.
    fn drop_in_background(&self, index: &str, dead: Vec<(String, f64)>) {
        if dead.is_empty() {
            return;
        }
        let store = self.clone();
        let index = index.to_owned();
        tokio::spawn(async move {
            // The all-index through the change log's script, which logs `expired` for what it
            // drops; only entries whose score has passed: a missing record with a later score
            // is being deregistered, and its deregistration logs it.
            let done = if index == store.keys.all_idx() {
                store.settle(&dead, &[], true).await.map(|_| ())
            } else {
                store.drop_from_index(&index, &dead).await.map(|_| ())
            };
            if let Err(e) = done {
                tracing::debug!(error = %e, index, "index cleanup on read failed");
            }
        });
    }

    /// Fetches the records of `ids` in one pipelined round trip; missing ones are `None`.
    async fn fetch(&self, ids: &[(Ulid, f64)]) -> Result<Vec<Option<ServiceRecord>>, StoreError> {
        let keys: Vec<String> = ids.iter().map(|(id, _)| self.keys.svc(*id)).collect();
        let replies: Vec<Value> = self
            .read(|| async {
                let pipeline = self.client.pipeline();
                for key in &keys {
                    pipeline.get::<(), _>(key).await?;
                }
                pipeline.all().await
            })
            .await?;
        if replies.len() != ids.len() {
            return Err(StoreError::Corrupt(format!(
                "pipeline of {} GET answered {} replies",
                ids.len(),
                replies.len()
            )));
        }
        ids.iter()
            .zip(replies)
            .map(|((id, _), reply)| record_from_value(*id, &reply))
            .collect()
    }
}

impl Listing for ValkeyListing {
    async fn next_page(&mut self, limit: usize) -> Result<Vec<Arc<ServiceRecord>>, StoreError> {
        let mut page = Vec::new();
        let mut dead = Vec::new();
        while page.len() < limit && self.next < self.candidates.len() {
            // Without info conditions nearly every candidate matches: fetch no more than the
            // page needs. With them, fetch full batches.
            let want = limit - page.len();
            let step = if self.filter.info.is_empty() {
                want
            } else {
                want.max(BATCH)
            };
            let end = self.candidates.len().min(self.next + step.min(BATCH));
            let chunk = &self.candidates[self.next..end];
            let records = self.store.fetch(chunk).await?;
            for ((id, score), record) in chunk.iter().zip(records) {
                if page.len() == limit {
                    break;
                }
                self.next += 1;
                match record {
                    Some(r) if self.filter.matches(&r) => page.push(Arc::new(r)),
                    Some(_) => {}
                    None => dead.push((id.to_string(), *score)),
                }
            }
        }
        if let Some(index) = &self.index {
            self.store.drop_in_background(index, dead);
        }
        Ok(page)
    }
}
