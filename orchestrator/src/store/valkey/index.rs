//! Index maintenance. The sorted sets live in other slots than the records, so they cannot
//! change atomically with them. Instead every score is an expiry: the `expires_at` of a version
//! of the id's record (which the register script makes strictly increase from version to
//! version), or a register's hint (the expiry it expects, written before its script). Scores
//! are only ever raised (`ZADD GT`), so (details in `docs/valkey-store.md`, "Index
//! consistency"):
//! - *a live record is in `{all}:idx` and in its name's index* once its register returned,
//!   because entries are removed only where the score is at most an older version's expiry or
//!   is the very score a reader saw with the record gone, which no later version can have; and
//!   whatever was lost anyway, its next ping in each TTL period puts back;
//! - *no entry outlives its record by more than about one TTL*: no score lies more than one TTL
//!   beyond its write, and the sweeper drops dead entries once their score has passed.

use fred::interfaces::{
    ClientLike, HashesInterface, KeysInterface, SetsInterface, SortedSetsInterface,
};
use fred::types::sorted_sets::Ordering as ZOrdering;
use fred::types::{ClusterHash, CustomCommand, SetOptions, Value};
use servicekit::protocol::Timestamp;
use ulid::Ulid;

use super::connection::queue;
use super::record::expiry_and_name;
use super::scripts::INDEX_DROP;
use super::ValkeyStore;
use crate::store::StoreError;

/// Records fetched per pipelined round trip when listing, candidates per sweep pass.
pub(super) const BATCH: usize = 1000;

/// Whether an index entry is dropped with an exact score match or any score up to it.
#[derive(Debug, Clone, Copy)]
pub(super) enum DropMode {
    Equal,
    AtMost,
}

impl DropMode {
    fn arg(self) -> &'static str {
        match self {
            DropMode::Equal => "eq",
            DropMode::AtMost => "le",
        }
    }
}

impl ValkeyStore {
    pub(super) async fn server_now(&self) -> Result<u64, StoreError> {
        let cmd = CustomCommand::new_static("TIME", ClusterHash::Random, false);
        let parts: Vec<String> = self.note(self.client.custom(cmd, Vec::<String>::new()).await)?;
        let secs = parts.first().and_then(|s| s.parse::<u64>().ok());
        let micros = parts.get(1).and_then(|s| s.parse::<u64>().ok());
        match (secs, micros) {
            (Some(s), Some(us)) => Ok(s * 1000 + us / 1000),
            _ => Err(StoreError::Corrupt(format!("TIME answered {parts:?}"))),
        }
    }

    /// Indexes `id` under `name` with `score`, never lowering a score already there (`ZADD
    /// GT`; absent entries are added). The name goes into the names set only after the entry
    /// is in, so the sweeper's "forget empty names" step cannot miss it.
    pub(super) async fn index_at(
        &self,
        id: Ulid,
        name: &str,
        score: u64,
    ) -> Result<(), StoreError> {
        self.index_checking(id, name, score, false)
            .await
            .map(|_| ())
    }

    /// [`Self::index_at`], and with `check`, whether the change log has announced `id` (in
    /// the same round trip; `true` without `check`).
    pub(super) async fn index_checking(
        &self,
        id: Ulid,
        name: &str,
        score: u64,
        check: bool,
    ) -> Result<bool, StoreError> {
        let pipeline = self.client.pipeline();
        let member = id.to_string();
        let score = score as f64;
        for index in [self.keys.all_idx(), self.keys.name_idx(name)] {
            queue(
                pipeline
                    .zadd::<(), _, _>(
                        index,
                        None,
                        Some(ZOrdering::GreaterThan),
                        false,
                        false,
                        (score, member.clone()),
                    )
                    .await,
            )?;
        }
        if check {
            queue(
                pipeline
                    .hexists::<(), _, _>(self.keys.announced(), member)
                    .await,
            )?;
        }
        let replies: Vec<Value> = self.note(pipeline.all().await)?;
        let _: i64 = self.note(self.client.sadd(self.keys.names(), name).await)?;
        Ok(!check || replies.get(2).and_then(Value::as_bool).unwrap_or(true))
    }

    /// After the record script wrote version `expires_at` of `id` under `name`: raises its
    /// entries to that expiry (adding them if a reader dropped the hint before the script ran)
    /// and drops the id from its previous name's index (only up to the replaced version's
    /// expiry). Best effort: the hint keeps the record listed, and pings repair the rest.
    pub(super) async fn index_version(
        &self,
        id: Ulid,
        name: &str,
        expires_at: Timestamp,
        previous: Option<(String, String)>,
    ) {
        let old_index = async {
            match &previous {
                Some((old_name, old_expires)) => {
                    let entry = [id.to_string(), old_expires.clone()];
                    let index = self.keys.name_idx(old_name);
                    self.drop_entries(&index, &entry, DropMode::AtMost)
                        .await
                        .map(|_| ())
                }
                None => Ok(()),
            }
        };
        let (a, b) = tokio::join!(self.index_at(id, name, expires_at.as_millis()), old_index);
        if let Err(e) = a.and(b) {
            tracing::debug!(error = %e, %id, "index update after register failed; the hint stays");
        }
    }

    /// The records behind index entries `candidates` (member, score), read in one pipeline:
    /// `(id, member, score, reply)` for each member that is an id, and the members that are not
    /// (dead entries whatever they hold).
    #[allow(clippy::type_complexity)]
    pub(super) async fn records_of(
        &self,
        candidates: &[(String, f64)],
    ) -> Result<(Vec<(Ulid, String, f64, Value)>, Vec<(String, f64)>), StoreError> {
        let pipeline = self.client.pipeline();
        let mut checked = Vec::with_capacity(candidates.len());
        let mut not_ids = Vec::new();
        for (member, score) in candidates {
            match Ulid::from_string(member) {
                Ok(id) => {
                    queue(pipeline.get::<(), _>(self.keys.svc(id)).await)?;
                    checked.push((id, member.clone(), *score));
                }
                Err(_) => not_ids.push((member.clone(), *score)),
            }
        }
        let replies: Vec<Value> = if checked.is_empty() {
            Vec::new()
        } else {
            self.note(pipeline.all().await)?
        };
        if replies.len() != checked.len() {
            return Err(StoreError::Corrupt(format!(
                "pipeline of {} GET answered {} replies",
                checked.len(),
                replies.len()
            )));
        }
        let records = checked
            .into_iter()
            .zip(replies)
            .map(|((id, member, score), reply)| (id, member, score, reply))
            .collect();
        Ok((records, not_ids))
    }

    /// The score a register gives its id before the record script runs: the expiry the
    /// record will get, by this process's clock. A hint that is low (a slow clock, a script
    /// that ran late) is harmless: ZADD GT replaces it by the real expiry after the script,
    /// and the sweeper rescores it from a live record; a high one (a fast clock) only delays
    /// the drop of a dead hint.
    pub(super) fn hint_score(&self) -> u64 {
        Timestamp::now().saturating_add(self.ttl).as_millis()
    }

    /// Drops `id` from both of its indexes where its score is still `score`. Best effort: a
    /// failure only leaves a dead entry behind. The all-index entry goes through the change
    /// log's script, like every all-index drop (it logs nothing for an id never announced).
    pub(super) async fn unindex(&self, id: Ulid, name: &str, score: u64) {
        let by_name = self.keys.name_idx(name);
        let pair = [(id.to_string(), score as f64)];
        let entry = [id.to_string(), score.to_string()];
        let (a, b) = tokio::join!(
            self.settle(&pair, &[], false),
            self.drop_entries(&by_name, &entry, DropMode::Equal),
        );
        if let Err(e) = a.map(|_| ()).and(b.map(|_| ())) {
            tracing::debug!(error = %e, %id, "index cleanup failed; the sweeper will finish it");
        }
    }

    /// Drops the given (member, score) pairs from `index` unless their score changed meanwhile.
    pub(super) async fn drop_from_index(
        &self,
        index: &str,
        entries: &[(String, f64)],
    ) -> Result<usize, StoreError> {
        let mut dropped = 0;
        for chunk in entries.chunks(BATCH) {
            let args: Vec<String> = chunk
                .iter()
                .flat_map(|(member, score)| [member.clone(), score_text(*score)])
                .collect();
            dropped += self.drop_entries(index, &args, DropMode::Equal).await?;
        }
        Ok(dropped)
    }

    /// Runs [`INDEX_DROP`] on `index` with flat `member, score` pairs.
    pub(super) async fn drop_entries(
        &self,
        index: &str,
        pairs: &[String],
        mode: DropMode,
    ) -> Result<usize, StoreError> {
        let mut args = Vec::with_capacity(pairs.len() + 1);
        args.push(mode.arg().to_owned());
        args.extend_from_slice(pairs);
        let n = self.note(
            INDEX_DROP
                .run(&self.client, vec![index.to_owned()], args)
                .await,
        )?;
        Ok(usize::try_from(int_of(&n)?).unwrap_or(0))
    }

    /// Sweeps one by-name index; returns how many entries were dropped. Entries whose record
    /// now has another display name are dropped too. (The all-index is the reaper's:
    /// `log.rs`, which logs what it drops.)
    pub(super) async fn sweep_index(
        &self,
        index: &str,
        name: Option<&str>,
        now: u64,
    ) -> Result<usize, StoreError> {
        let mut dropped = 0;
        loop {
            let candidates: Vec<(String, f64)> = self.note(
                self.client
                    .zrangebyscore(index, "-inf", now as f64, true, Some((0, BATCH as i64)))
                    .await,
            )?;
            if candidates.is_empty() {
                break;
            }
            let (checked, mut dead) = self.records_of(&candidates).await?;
            let mut progress = 0;
            let rescore = self.client.pipeline();
            let mut rescored = 0;
            for (_, member, score, reply) in checked {
                let (expires, record_name) = expiry_and_name(&reply);
                let moved = matches!((name, record_name), (Some(n), Some(r)) if n != r);
                match expires {
                    Some(expires_at) if !moved => {
                        if expires_at > now {
                            progress += 1;
                        }
                        queue(
                            rescore
                                .zadd::<(), _, _>(
                                    index,
                                    Some(SetOptions::XX),
                                    Some(ZOrdering::GreaterThan),
                                    false,
                                    false,
                                    (expires_at as f64, member),
                                )
                                .await,
                        )?;
                        rescored += 1;
                    }
                    // Expired or renamed: a registration under this name in between changed
                    // the score with its hint, so the conditional drop keeps it.
                    _ => dead.push((member, score)),
                }
            }
            if rescored > 0 {
                let _: Vec<Value> = self.note(rescore.all().await)?;
            }
            if !dead.is_empty() {
                let n = self.drop_from_index(index, &dead).await?;
                dropped += n;
                progress += n;
            }
            if candidates.len() < BATCH || progress == 0 {
                break;
            }
        }
        Ok(dropped)
    }

    /// Sweeps the by-name indexes of `names`: one round trip finds the indexes with expired
    /// scores, only those are swept, then empty indexes are forgotten.
    pub(super) async fn sweep_names(
        &self,
        names: &[String],
        now: u64,
    ) -> Result<usize, StoreError> {
        let pipeline = self.client.pipeline();
        for name in names {
            queue(
                pipeline
                    .zrangebyscore::<(), _, _, _>(
                        self.keys.name_idx(name),
                        "-inf",
                        now as f64,
                        false,
                        Some((0, 1)),
                    )
                    .await,
            )?;
        }
        let firsts: Vec<Value> = self.note(pipeline.all().await)?;
        if firsts.len() != names.len() {
            return Err(StoreError::Corrupt(format!(
                "pipeline of {} ZRANGEBYSCORE answered {} replies",
                names.len(),
                firsts.len()
            )));
        }
        let mut dropped = 0;
        for (name, first) in names.iter().zip(firsts) {
            if !is_empty_reply(&first) {
                dropped += self
                    .sweep_index(&self.keys.name_idx(name), Some(name), now)
                    .await?;
            }
        }
        self.forget_empty_names(names).await?;
        Ok(dropped)
    }

    /// Which of `names` have an empty by-name index (one pipelined round trip).
    async fn empty_names(&self, names: &[String]) -> Result<Vec<String>, StoreError> {
        let pipeline = self.client.pipeline();
        for name in names {
            queue(pipeline.zcard::<(), _>(self.keys.name_idx(name)).await)?;
        }
        let counts: Vec<Value> = self.note(pipeline.all().await)?;
        if counts.len() != names.len() {
            return Err(StoreError::Corrupt(format!(
                "pipeline of {} ZCARD answered {} replies",
                names.len(),
                counts.len()
            )));
        }
        let mut empty = Vec::new();
        for (name, count) in names.iter().zip(counts) {
            if int_of(&count)? == 0 {
                empty.push(name.clone());
            }
        }
        Ok(empty)
    }

    /// Removes names with an empty index from the names set.
    async fn forget_empty_names(&self, names: &[String]) -> Result<(), StoreError> {
        let empty = self.empty_names(names).await?;
        if empty.is_empty() {
            return Ok(());
        }
        let _: i64 = self.note(self.client.srem(self.keys.names(), empty.clone()).await)?;
        // A registration may have indexed a name between ZCARD and SREM: put it back.
        let still_empty = self.empty_names(&empty).await?;
        let refilled: Vec<String> = empty
            .into_iter()
            .filter(|name| !still_empty.contains(name))
            .collect();
        if !refilled.is_empty() {
            let _: i64 = self.note(self.client.sadd(self.keys.names(), refilled).await)?;
        }
        Ok(())
    }
}

/// Scores are integral milliseconds; render them without a fraction so Lua compares exactly.
fn score_text(score: f64) -> String {
    format!("{score:.0}")
}

fn int_of(v: &Value) -> Result<i64, StoreError> {
    match v {
        Value::Integer(i) => Ok(*i),
        other => other
            .as_string()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| StoreError::Corrupt(format!("expected an integer, got {other:?}"))),
    }
}

/// Whether a reply is an empty (or nil) array.
fn is_empty_reply(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_render_as_integers() {
        assert_eq!(score_text(1_761_566_430_123.0), "1761566430123");
    }
}
