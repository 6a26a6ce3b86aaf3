//! The change log: what happened to registrations, in order, for the watch feed.
//!
//! Each store keeps a bounded log of changes (registered, updated, deregistered, expired)
//! under totally ordered [`Cursor`]s. Readers (the orchestrator's watch hub, a watcher
//! resuming with `Last-Event-ID`) ask for the changes after a cursor; when the log no longer
//! holds them, the answer is [`Changes::Gap`] and the reader starts over from a snapshot, so a
//! reader never misses a change silently. In Valkey the log is a stream every orchestrator
//! replica appends to and reads, so a change made through one replica reaches watchers on all
//! of them (see `docs/valkey-store.md`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use servicekit::protocol::{RemovedService, ServiceInfo, ServiceRecord, WatchEventKind};
use ulid::Ulid;

/// How many changes a store's log keeps (about: Valkey trims it approximately). A reader that
/// falls further behind gets [`Changes::Gap`].
pub const CHANGE_LOG_LEN: usize = 10_000;

/// A position in the change log: milliseconds and a sequence number, as a Valkey stream entry
/// id (`1700000000000-0`). Ordered; clients see it as the SSE `id:` and treat it as opaque.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    pub ms: u64,
    pub seq: u64,
}

impl Cursor {
    /// Before every change: the head of an empty log.
    pub const ZERO: Cursor = Cursor { ms: 0, seq: 0 };
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A text that is not `MS-SEQ` with two decimal numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a change cursor (MS-SEQ)")]
pub struct CursorError;

impl FromStr for Cursor {
    type Err = CursorError;

    fn from_str(text: &str) -> Result<Self, CursorError> {
        let (ms, seq) = text.split_once('-').ok_or(CursorError)?;
        let number = |s: &str| {
            if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(CursorError);
            }
            s.parse::<u64>().map_err(|_| CursorError)
        };
        Ok(Cursor {
            ms: number(ms)?,
            seq: number(seq)?,
        })
    }
}

/// What happened to a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// A registration created an entry the log had not announced yet.
    Registered,
    /// A registration refreshed an announced entry (its info may be the same).
    Updated,
    /// The entry was deregistered.
    Deregistered,
    /// The entry's TTL ran out.
    Expired,
}

impl ChangeKind {
    /// The watch feed's event for this change.
    pub const fn event(self) -> WatchEventKind {
        match self {
            ChangeKind::Registered => WatchEventKind::Registered,
            ChangeKind::Updated => WatchEventKind::Updated,
            ChangeKind::Deregistered => WatchEventKind::Deregistered,
            ChangeKind::Expired => WatchEventKind::Expired,
        }
    }

    /// Whether the change removes the entry.
    pub const fn is_removal(self) -> bool {
        matches!(self, ChangeKind::Deregistered | ChangeKind::Expired)
    }

    /// The change named like its watch feed event (how the Valkey log stores the kind);
    /// `None` for `snapshot` and unknown names.
    pub fn parse(text: &str) -> Option<ChangeKind> {
        [
            ChangeKind::Registered,
            ChangeKind::Updated,
            ChangeKind::Deregistered,
            ChangeKind::Expired,
        ]
        .into_iter()
        .find(|k| k.event().as_str() == text)
    }
}

/// What the log knows of the entry a change concerns.
#[derive(Debug, Clone, PartialEq)]
pub enum Subject {
    /// The whole record: after a registration, and for a removal when the store still had it.
    Record(Arc<ServiceRecord>),
    /// Only what a Valkey log keeps for an entry whose record Valkey already deleted when its
    /// expiry was noticed.
    Known {
        id: Ulid,
        url: String,
        display_name: String,
    },
}

impl Subject {
    pub fn id(&self) -> Ulid {
        match self {
            Subject::Record(r) => r.id,
            Subject::Known { id, .. } => *id,
        }
    }

    pub fn url(&self) -> &str {
        match self {
            Subject::Record(r) => &r.url,
            Subject::Known { url, .. } => url,
        }
    }

    pub fn display_name(&self) -> &str {
        match self {
            Subject::Record(r) => &r.info.display_name,
            Subject::Known { display_name, .. } => display_name,
        }
    }

    /// The data of a removal event.
    pub fn removed(&self) -> RemovedService {
        match self {
            Subject::Record(r) => RemovedService::from(&**r),
            Subject::Known {
                id,
                url,
                display_name,
            } => RemovedService {
                id: *id,
                url: url.clone(),
                info: Some(ServiceInfo::new(display_name.clone())),
                expires_at: None,
            },
        }
    }
}

/// One entry of the change log.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub cursor: Cursor,
    pub kind: ChangeKind,
    pub subject: Subject,
}

/// The answer to [`Store::changes`](super::Store::changes).
#[derive(Debug, Clone, PartialEq)]
pub enum Changes {
    /// The changes after the cursor asked for, oldest first; empty when none came in the wait.
    Changes(Vec<Change>),
    /// Some change after the cursor is no longer in the log (trimmed, or the log was lost),
    /// or the cursor lies beyond the newest change: start over from a snapshot.
    Gap,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_kinds_round_trip_through_their_event_names() {
        for kind in [
            ChangeKind::Registered,
            ChangeKind::Updated,
            ChangeKind::Deregistered,
            ChangeKind::Expired,
        ] {
            assert_eq!(ChangeKind::parse(kind.event().as_str()), Some(kind));
        }
        assert_eq!(ChangeKind::parse("snapshot"), None);
        assert_eq!(ChangeKind::parse("Registered"), None);
    }

    #[test]
    fn cursors_order_and_round_trip_as_stream_ids() {
        let a: Cursor = "1700000000000-0".parse().unwrap();
        let b: Cursor = "1700000000000-1".parse().unwrap();
        let c: Cursor = "1700000000001-0".parse().unwrap();
        assert!(Cursor::ZERO < a && a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-1");
        for bad in [
            "",
            "1",
            "1-",
            "-1",
            "1-2-3",
            "a-1",
            "+1-2",
            "1 -2",
            "99999999999999999999999-1",
        ] {
            assert_eq!(bad.parse::<Cursor>(), Err(CursorError), "{bad:?}");
        }
    }
}
