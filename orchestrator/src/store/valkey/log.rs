//! The change log: a stream `P{all}:events` every orchestrator appends to and reads, and the
//! hash `P{all}:announced` of the ids it announced whose removal it has not logged yet. Both
//! live in the all-index's slot, so one script drops an all-index entry, settles its
//! announcement and logs the change: each announced id's removal is logged exactly once,
//! whichever replica (reaper, listing, deregistration) gets there first. Why that holds:
//! `docs/valkey-store.md`, "Change log".

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fred::clients::Client;
use fred::interfaces::{ClientLike, KeysInterface, SortedSetsInterface};
use fred::types::config::Options;
use fred::types::{ClusterHash, CustomCommand, Value};
use servicekit::protocol::ServiceRecord;
use ulid::Ulid;

use super::connection::{map_err, COMMAND_TIMEOUT};
use super::index::BATCH;
use super::record::{length_prefixed, record_from_value, record_head, RawRecord, STAMP_DIGITS};
use super::scripts::{ANNOUNCE, DEREGISTERED, LOG_READ, REAP};
use super::ValkeyStore;
use crate::logsafe::Untrusted;
use crate::store::{Change, ChangeKind, Changes, Cursor, StoreError, Subject};

/// What one settling step did (see `lua/reap.lua`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reaped {
    /// All-index entries dropped.
    pub(super) dropped: usize,
    /// `expired` changes logged.
    pub(super) logged: usize,
}

impl std::ops::AddAssign for Reaped {
    fn add_assign(&mut self, other: Reaped) {
        self.dropped += other.dropped;
        self.logged += other.logged;
    }
}

/// Where the log stands, as `lua/log_read.lua` reads it.
struct LogState {
    /// The id of the newest entry ever added.
    last: Cursor,
    /// The id of the newest entry trimmed away (`0-0`: none).
    deleted: Cursor,
    /// The id of the oldest entry still held.
    first: Cursor,
    /// Whether entries were trimmed away (all of them before `first`).
    trimmed: bool,
    /// Whether the stream holds the entry with exactly the reader's cursor as its id.
    held: bool,
}

impl LogState {
    /// Whether some change after `after` may be missing from the log, or `after` was never a
    /// position of this log: beyond its newest entry; before its oldest one when entries were
    /// trimmed (`MAXLEN ~` leaves max-deleted-entry-id alone, so which of them came after
    /// `after` is unknown: a reader exactly at the last trimmed entry re-snapshots needlessly,
    /// which is safe); before its oldest one anyway unless `after` is ZERO (a cursor from a
    /// log Valkey lost, written anew since); or before the newest one while the stream does
    /// not hold it (a failover lost the entry the cursor names, and the new master logged
    /// other changes since: what the reader read last may never have happened there). Two
    /// ids the stream may no longer hold stay valid: the newest (every snapshot starts
    /// there, so refusing it would re-snapshot forever) and the newest deleted one (`XDEL`
    /// by hand; nothing after it was deleted).
    fn gap_after(&self, after: Cursor) -> bool {
        after > self.last
            || after < self.deleted
            || (after < self.first && (self.trimmed || after != Cursor::ZERO))
            || (after != Cursor::ZERO && after < self.last && after != self.deleted && !self.held)
    }
}

impl ValkeyStore {
    /// The keys every log script takes, in their order: all-index, announced, events.
    fn log_keys(&self) -> Vec<String> {
        vec![
            self.keys.all_idx(),
            self.keys.announced(),
            self.keys.events(),
        ]
    }

    /// Logs `registered` (or `updated`, when the id is announced already) for `record`, the
    /// version a register just wrote (or a live record the log missed). Returns whether it
    /// logged: not when this version or a later one is announced already.
    pub(super) async fn announce(&self, record: &ServiceRecord) -> Result<bool, StoreError> {
        self.announce_version(record, false).await
    }

    /// Logs `updated` for `record`, changed without a new version (its health status): like
    /// [`Self::announce`], but also when this version is the one announced; not when a later
    /// one is (that write logged a record that already had this change).
    pub(super) async fn announce_change(&self, record: &ServiceRecord) -> Result<bool, StoreError> {
        self.announce_version(record, true).await
    }

    async fn announce_version(
        &self,
        record: &ServiceRecord,
        same_version: bool,
    ) -> Result<bool, StoreError> {
        let json = record_json(record)?;
        let reply = self.note(
            ANNOUNCE
                .run(
                    &self.client,
                    self.log_keys(),
                    vec![
                        record.id.to_string(),
                        stamp_text(record.expires_at.as_millis()),
                        record_head(&record.url, &record.info.display_name),
                        json,
                        self.log_len.to_string(),
                        if same_version { "1" } else { "0" }.to_owned(),
                    ],
                )
                .await,
        )?;
        Ok(!reply.is_null())
    }

    /// Announces the live record of `id` if it has one (a repair: the log missed its
    /// register). Best effort.
    pub(super) async fn announce_live(&self, id: Ulid) {
        let reply: Result<Value, _> = self.note(self.client.get(self.keys.svc(id)).await);
        let announced = match reply.and_then(|v| record_from_value(id, &v)) {
            Ok(Some(record)) => self.announce(&record).await.map(|_| ()),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = announced {
            tracing::debug!(error = %e, %id, "change log repair failed");
        }
    }

    /// Drops the all-index entry of the version `record` a deregistration deleted and logs
    /// `deregistered`, unless the removal is logged already or a later version is announced.
    pub(super) async fn log_deregistered(
        &self,
        record: &ServiceRecord,
    ) -> Result<bool, StoreError> {
        let json = record_json(record)?;
        let reply = self.note(
            DEREGISTERED
                .run(
                    &self.client,
                    self.log_keys(),
                    vec![
                        record.id.to_string(),
                        record.expires_at.as_millis().to_string(),
                        json,
                        self.log_len.to_string(),
                    ],
                )
                .await,
        )?;
        Ok(!reply.is_null())
    }

    /// Drops all-index entries whose record was seen missing (member, seen score) unless their
    /// score changed meanwhile, logging `expired` for the announced ones; raises the entries
    /// of `live` records (member, expires_at) to their expiry. With `due`, entries whose score
    /// has not passed yet are left alone. Returns what it did and the live ids the log never
    /// announced.
    pub(super) async fn settle(
        &self,
        gone: &[(String, f64)],
        live: &[(String, u64)],
        due: bool,
    ) -> Result<(Reaped, Vec<String>), StoreError> {
        let mut total = Reaped::default();
        let mut unannounced = Vec::new();
        let mut gone = gone.chunks(BATCH);
        let mut live = live.chunks(BATCH);
        loop {
            let (g, l) = (gone.next().unwrap_or(&[]), live.next().unwrap_or(&[]));
            if g.is_empty() && l.is_empty() {
                return Ok((total, unannounced));
            }
            let mut args = Vec::with_capacity(3 + 2 * (g.len() + l.len()));
            args.push(self.log_len.to_string());
            args.push(if due { "1" } else { "0" }.to_owned());
            args.push(g.len().to_string());
            for (member, score) in g {
                args.push(member.clone());
                args.push(format!("{score:.0}"));
            }
            for (member, expires_at) in l {
                args.push(member.clone());
                args.push(expires_at.to_string());
            }
            let reply = self.note(REAP.run(&self.client, self.log_keys(), args).await)?;
            let (reaped, ids) = reaped_of(reply)?;
            total += reaped;
            unannounced.extend(ids);
        }
    }

    /// Reaps the all-index: every entry whose score has passed by `now` (the server's clock)
    /// is looked at; a missing (or malformed) record's entry is dropped and its removal logged
    /// as `expired`, a live one is raised to its record's expiry, and a live record the log
    /// never announced is announced (a register that died between its record and its
    /// announcement). Shared by [`Store::reap`](crate::store::Store::reap) and the sweep.
    pub(super) async fn reap_index(&self, now: u64) -> Result<Reaped, StoreError> {
        let index = self.keys.all_idx();
        let mut total = Reaped::default();
        loop {
            let candidates: Vec<(String, f64)> = self.note(
                self.client
                    .zrangebyscore(&index, "-inf", now as f64, true, Some((0, BATCH as i64)))
                    .await,
            )?;
            if candidates.is_empty() {
                break;
            }
            let (checked, mut gone) = self.records_of(&candidates).await?;
            let mut live = Vec::new();
            let mut records = HashMap::new();
            let mut ahead = 0;
            for (id, member, score, reply) in checked {
                let record = reply
                    .as_bytes()
                    .and_then(|bytes| RawRecord::parse(bytes).ok())
                    .and_then(|raw| raw.into_record(id).ok());
                match record {
                    Some(record) => {
                        let expires_at = record.expires_at.as_millis();
                        if expires_at > now {
                            ahead += 1;
                        }
                        live.push((member.clone(), expires_at));
                        records.insert(member, record);
                    }
                    // Missing or malformed: dead either way (a malformed record cannot be
                    // served; the log reports it gone).
                    None => gone.push((member, score)),
                }
            }
            let (reaped, unannounced) = self.settle(&gone, &live, false).await?;
            total += reaped;
            for member in unannounced {
                if let Some(record) = records.get(&member) {
                    // Best effort: the next pass tries again.
                    if let Err(e) = self.announce(record).await {
                        tracing::debug!(error = %e, id = %record.id, "change log repair failed");
                    }
                }
            }
            if candidates.len() < BATCH || ahead + reaped.dropped == 0 {
                break;
            }
        }
        Ok(total)
    }

    /// Where the log stands and up to `limit` entries after `after` (none for `limit` 0).
    async fn read_log(
        &self,
        after: Cursor,
        limit: usize,
    ) -> Result<Option<(LogState, Vec<Value>)>, StoreError> {
        let (keys, args) = (
            vec![self.keys.events()],
            vec![after.to_string(), limit.to_string()],
        );
        let reply = self
            .read(|| LOG_READ.run(&self.client, keys.clone(), args.clone()))
            .await?;
        if reply.is_null() {
            return Ok(None);
        }
        let items = match reply {
            Value::Array(items) if items.len() == 6 => items,
            other => return Err(StoreError::Corrupt(format!("log read answered {other:?}"))),
        };
        let mut items = items.into_iter();
        let mut next_cursor = |what: &str| -> Result<Cursor, StoreError> {
            let v = items.next().unwrap_or(Value::Null);
            let text = v.as_string().unwrap_or_default();
            text.parse::<Cursor>().map_err(|_| {
                StoreError::Corrupt(format!("change log {what}: not a stream id: {v:?}"))
            })
        };
        let (last, deleted, first) = (
            next_cursor("last-generated-id")?,
            next_cursor("max-deleted-entry-id")?,
            next_cursor("recorded-first-entry-id")?,
        );
        let flag = |what: &str, v: Option<Value>| match v {
            Some(Value::Integer(n)) => Ok(n != 0),
            other => Err(StoreError::Corrupt(format!("change log {what}: {other:?}"))),
        };
        let trimmed = flag("trimmed flag", items.next())?;
        let entries = match items.next() {
            Some(Value::Array(entries)) => entries,
            Some(Value::Null) | None => Vec::new(),
            Some(other) => {
                return Err(StoreError::Corrupt(format!(
                    "change log entries: expected an array, got {other:?}"
                )))
            }
        };
        let held = flag("held flag", items.next())?;
        let state = LogState {
            last,
            deleted,
            first,
            trimmed,
            held,
        };
        Ok(Some((state, entries)))
    }

    /// [`Store::change_head`](crate::store::Store::change_head).
    pub(super) async fn log_head(&self) -> Result<Cursor, StoreError> {
        Ok(self
            .read_log(Cursor::ZERO, 0)
            .await?
            .map_or(Cursor::ZERO, |(state, _)| state.last))
    }

    /// The changes after `after`, without waiting.
    async fn log_after(&self, after: Cursor, limit: usize) -> Result<Changes, StoreError> {
        let Some((state, entries)) = self.read_log(after, limit.max(1)).await? else {
            // No log at all: empty (or lost with the rest of Valkey's data).
            return Ok(if after == Cursor::ZERO {
                Changes::Changes(Vec::new())
            } else {
                Changes::Gap
            });
        };
        if state.gap_after(after) {
            return Ok(Changes::Gap);
        }
        let mut changes = Vec::with_capacity(entries.len());
        for entry in entries {
            match decode_entry(entry) {
                Ok(change) => changes.push(change),
                // A change nobody can read is a change lost: hand out what came before it;
                // the reader's next call starts at the bad entry and gets a gap, so it
                // re-snapshots instead of missing the change silently.
                Err((cursor, why)) if changes.is_empty() => {
                    tracing::warn!(cursor = %cursor, error = %Untrusted(&why), "store.change_log_corrupt");
                    return Ok(Changes::Gap);
                }
                Err(_) => break,
            }
        }
        Ok(Changes::Changes(changes))
    }

    /// [`Store::changes`](crate::store::Store::changes): read; when nothing is there and the
    /// caller waits, block on a connection of our own until an entry after `after` arrives
    /// (a blocking command on the shared client would stall every other command), then read
    /// again, so gap detection always runs on what is returned.
    pub(super) async fn log_changes(
        &self,
        after: Cursor,
        limit: usize,
        wait: Duration,
    ) -> Result<Changes, StoreError> {
        match self.log_after(after, limit).await? {
            Changes::Changes(v) if v.is_empty() && !wait.is_zero() => {}
            answer => return Ok(answer),
        }
        if self.wait_for_entry(after, wait).await? {
            self.log_after(after, limit).await
        } else {
            Ok(Changes::Changes(Vec::new()))
        }
    }

    /// `XREAD BLOCK` for one entry after `after` on the dedicated client; whether one came.
    async fn wait_for_entry(&self, after: Cursor, wait: Duration) -> Result<bool, StoreError> {
        let client = self.blocking_client().await?;
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        // XREAD COUNT 1 BLOCK ms STREAMS key id: the key is argument 5.
        let cmd = CustomCommand::new_static("XREAD", ClusterHash::Offset(5), true);
        let args: Vec<String> = vec![
            "COUNT".into(),
            "1".into(),
            "BLOCK".into(),
            wait_ms.to_string(),
            "STREAMS".into(),
            self.keys.events(),
            after.to_string(),
        ];
        let options = Options {
            timeout: Some(wait + COMMAND_TIMEOUT),
            ..Options::default()
        };
        let reply: Value = client
            .with_options(&options)
            .custom(cmd, args)
            .await
            .map_err(map_err)?;
        Ok(!reply.is_null())
    }

    /// The client for blocking reads: a second connection, opened on first use, so only
    /// the process's one waiting reader (the watch hub) costs one.
    async fn blocking_client(&self) -> Result<&Client, StoreError> {
        self.blocker
            .get_or_try_init(|| async {
                let client = super::connection::second_client(&self.client);
                let _task = client.connect();
                match tokio::time::timeout(COMMAND_TIMEOUT, client.wait_for_connect()).await {
                    Ok(Ok(())) => Ok(client),
                    Ok(Err(e)) => {
                        let _ = client.quit().await;
                        Err(map_err(e))
                    }
                    Err(_) => {
                        let _ = client.quit().await;
                        Err(StoreError::Unavailable(
                            "no connection for the change log's blocking reads".into(),
                        ))
                    }
                }
            })
            .await
    }
}

/// A record as the log carries it: its JSON (the watch feed's `data`).
fn record_json(record: &ServiceRecord) -> Result<String, StoreError> {
    serde_json::to_string(record)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode record {}: {e}", record.id)))
}

/// `ms` as exactly [`STAMP_DIGITS`] digits, as the record header holds it.
fn stamp_text(ms: u64) -> String {
    format!("{ms:0STAMP_DIGITS$}")
}

/// `lua/reap.lua`'s reply.
fn reaped_of(reply: Value) -> Result<(Reaped, Vec<String>), StoreError> {
    let count = |v: &Value| v.as_u64().and_then(|n| usize::try_from(n).ok());
    match reply {
        Value::Array(items) if items.len() == 3 => {
            let (Some(dropped), Some(logged)) = (count(&items[0]), count(&items[1])) else {
                return Err(StoreError::Corrupt(format!("reap answered {items:?}")));
            };
            let ids = match &items[2] {
                Value::Array(ids) => ids.iter().filter_map(Value::as_string).collect(),
                _ => Vec::new(),
            };
            Ok((Reaped { dropped, logged }, ids))
        }
        other => Err(StoreError::Corrupt(format!("reap answered {other:?}"))),
    }
}

/// One stream entry (`[id, [field, value, ...]]`) as a change; the error names the entry
/// (when its id could be read) and what is wrong. Never panics.
fn decode_entry(entry: Value) -> Result<Change, (String, String)> {
    let Value::Array(parts) = entry else {
        return Err((String::new(), "not an array".into()));
    };
    let mut parts = parts.into_iter();
    let id_text = parts.next().and_then(|v| v.as_string()).unwrap_or_default();
    let fail = |why: String| (id_text.clone(), why);
    let cursor: Cursor = id_text
        .parse()
        .map_err(|_| fail("the entry id is not MS-SEQ".into()))?;
    let Some(Value::Array(fields)) = parts.next() else {
        return Err(fail("no fields".into()));
    };
    let (mut kind, mut id, mut data) = (None, None, None);
    for pair in fields.chunks(2) {
        let [name, value] = pair else {
            return Err(fail("odd number of fields".into()));
        };
        match name.as_str().as_deref() {
            Some("kind") => kind = value.as_string(),
            Some("id") => id = value.as_string(),
            Some("data") => data = value.as_bytes().map(<[u8]>::to_vec),
            _ => {}
        }
    }
    let (Some(kind), Some(id), Some(data)) = (kind, id, data) else {
        return Err(fail("kind, id or data missing".into()));
    };
    let id = Ulid::from_string(&id).map_err(|_| fail(format!("bad id {id:?}")))?;
    let kind = ChangeKind::parse(&kind).ok_or_else(|| fail(format!("unknown kind {kind:?}")))?;
    let subject = if kind == ChangeKind::Expired {
        known_subject(id, &data).map_err(fail)?
    } else {
        let record: ServiceRecord =
            serde_json::from_slice(&data).map_err(|e| fail(format!("bad record JSON: {e}")))?;
        if record.id != id {
            return Err(fail("the record's id is not the entry's".into()));
        }
        Subject::Record(Arc::new(record))
    };
    Ok(Change {
        cursor,
        kind,
        subject,
    })
}

/// What an announcement knows (`lua/announce.lua`): the version's expiry, then the URL and the
/// display name, length-prefixed.
fn known_subject(id: Ulid, data: &[u8]) -> Result<Subject, String> {
    let rest = data
        .get(STAMP_DIGITS..)
        .ok_or_else(|| "announcement shorter than its stamp".to_owned())?;
    let (url, rest) = length_prefixed(rest, "url")?;
    let (name, _) = length_prefixed(rest, "display name")?;
    Ok(Subject::Known {
        id,
        url: url.to_owned(),
        display_name: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fred::bytes::Bytes;

    fn entry(id: &str, fields: &[(&str, &[u8])]) -> Value {
        let mut flat = Vec::new();
        for (k, v) in fields {
            flat.push(Value::String((*k).into()));
            flat.push(Value::Bytes(Bytes::copy_from_slice(v)));
        }
        Value::Array(vec![Value::String(id.into()), Value::Array(flat)])
    }

    #[test]
    fn expired_entries_decode_to_what_the_announcement_knew() {
        let id = Ulid::new();
        let data = format!(
            "{}{}",
            stamp_text(1_700_000_000_000),
            record_head("http://a:1", "svc:a")
        );
        let change = decode_entry(entry(
            "1700000000000-3",
            &[
                ("kind", b"expired"),
                ("id", id.to_string().as_bytes()),
                ("data", data.as_bytes()),
            ],
        ))
        .expect("decodes");
        assert_eq!(change.cursor, "1700000000000-3".parse().unwrap());
        assert_eq!(change.kind, ChangeKind::Expired);
        assert_eq!(
            change.subject,
            Subject::Known {
                id,
                url: "http://a:1".into(),
                display_name: "svc:a".into()
            }
        );
    }

    #[test]
    fn malformed_entries_are_errors_never_panics() {
        let id = Ulid::new().to_string();
        let other = Ulid::new().to_string();
        let record = format!(
            r#"{{"id":"{other}","url":"http://a:1","info":{{"display_name":"a"}},"registered_at":"2024-01-01T00:00:00Z","last_updated":"2024-01-01T00:00:00Z","last_ping_at":"2024-01-01T00:00:00Z","expires_at":"2024-01-01T00:00:00Z"}}"#
        );
        let cases: Vec<Value> = vec![
            Value::Null,
            Value::String("x".into()),
            Value::Array(vec![]),
            Value::Array(vec![Value::String("1-0".into())]),
            entry("nope", &[("kind", b"registered")]),
            entry("1-0", &[("kind", b"registered"), ("id", id.as_bytes())]),
            entry(
                "1-0",
                &[("kind", b"bogus"), ("id", id.as_bytes()), ("data", b"{}")],
            ),
            entry(
                "1-0",
                &[("kind", b"updated"), ("id", b"not-an-id"), ("data", b"{}")],
            ),
            entry(
                "1-0",
                &[("kind", b"updated"), ("id", id.as_bytes()), ("data", b"{")],
            ),
            entry(
                "1-0",
                &[
                    ("kind", b"updated"),
                    ("id", id.as_bytes()),
                    ("data", record.as_bytes()),
                ],
            ),
            entry(
                "1-0",
                &[
                    ("kind", b"expired"),
                    ("id", id.as_bytes()),
                    ("data", b"123"),
                ],
            ),
            entry(
                "1-0",
                &[
                    ("kind", b"expired"),
                    ("id", id.as_bytes()),
                    ("data", b"1700000000000-5:ab"),
                ],
            ),
            entry(
                "1-0",
                &[
                    ("kind", b"expired"),
                    ("id", id.as_bytes()),
                    ("data", b"170000000000099:ab2:cd"),
                ],
            ),
            Value::Array(vec![
                Value::String("1-0".into()),
                Value::Array(vec![Value::String("kind".into())]),
            ]),
        ];
        for case in cases {
            assert!(decode_entry(case.clone()).is_err(), "{case:?}");
        }
    }

    #[test]
    fn gaps_are_trimmed_lost_or_foreign_cursors() {
        let c = |s: &str| s.parse::<Cursor>().unwrap();
        let untrimmed = LogState {
            last: c("100-0"),
            deleted: Cursor::ZERO,
            first: c("10-0"),
            trimmed: false,
            held: true,
        };
        assert!(!untrimmed.gap_after(Cursor::ZERO));
        assert!(!untrimmed.gap_after(c("10-0")));
        assert!(!untrimmed.gap_after(c("50-0")));
        assert!(!untrimmed.gap_after(c("100-0")));
        assert!(untrimmed.gap_after(c("100-1")), "beyond the head");
        assert!(untrimmed.gap_after(c("9-0")), "from a log that was lost");
        let trimmed = LogState {
            last: c("100-0"),
            deleted: Cursor::ZERO,
            first: c("41-0"),
            trimmed: true,
            held: true,
        };
        assert!(trimmed.gap_after(Cursor::ZERO));
        assert!(trimmed.gap_after(c("39-9")));
        assert!(
            trimmed.gap_after(c("40-0")),
            "the last trimmed entry: maybe, so a gap"
        );
        assert!(!trimmed.gap_after(c("41-0")));
        assert!(!trimmed.gap_after(c("70-0")));
        let deleted = LogState {
            deleted: c("45-0"),
            ..trimmed
        };
        assert!(deleted.gap_after(c("44-0")));
        let lost = LogState {
            held: false,
            ..untrimmed
        };
        assert!(
            lost.gap_after(c("50-0")),
            "an entry a failover lost, with newer ones after it"
        );
        assert!(
            !lost.gap_after(c("100-0")),
            "the newest id, its entry deleted"
        );
        let deleted_by_hand = LogState {
            deleted: c("50-0"),
            ..lost
        };
        assert!(!deleted_by_hand.gap_after(c("50-0")), "XDEL");
        assert!(!lost.gap_after(Cursor::ZERO));
        assert!(lost.gap_after(c("100-1")));
    }
}
