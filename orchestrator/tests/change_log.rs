//! The stores' change log (`Store::change_head`, `changes`, `reap`): what the watch feed reads.
//!
//! Each scenario is a function generic over [`Store`] taking two stores on one backend: two
//! orchestrator replicas on one Valkey (or two clones of one memory store). `scenarios!` runs
//! each as `memory::*`, `valkey::*` and on the test binary's shared six-node Valkey Cluster
//! (`cluster::*`). Scenarios that need the backend itself (flushing Valkey, a record lost
//! under a listing) are written out for Valkey only.

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use servicekit::protocol::{HealthReport, ServiceInfo, Timestamp};
use servicekit_orchestrator::store::{
    Access, Change, ChangeKind, Changes, Cursor, ListFilter, MemoryStore, Registration, Store,
    ValkeyStore,
};
use support::valkey::ValkeyServer;
use tokio::time::Instant;
use ulid::Ulid;

/// TTL of scenarios that never wait for expiry.
const LONG_TTL: Duration = Duration::from_secs(60);
/// TTL of scenarios that wait for expiry.
const SHORT_TTL: Duration = Duration::from_secs(1);
/// How long anything that should happen may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(15);

fn reg(url: &str, name: &str) -> Registration {
    Registration {
        url: url.to_owned(),
        info: ServiceInfo::new(name),
        requested_id: None,
        check: None,
    }
}

/// The changes after `after`, read in batches (waiting up to 200 ms each) until `done` holds
/// for what was read or the deadline passes; panics on a gap.
async fn read_until<S: Store>(
    store: &S,
    after: Cursor,
    mut done: impl FnMut(&[Change]) -> bool,
) -> Vec<Change> {
    let deadline = Instant::now() + DEADLINE;
    let mut cursor = after;
    let mut seen = Vec::new();
    while !done(&seen) {
        assert!(
            Instant::now() < deadline,
            "the log did not show what was expected in time; it holds {seen:#?}"
        );
        match store
            .changes(cursor, 100, Duration::from_millis(200))
            .await
            .expect("changes")
        {
            Changes::Changes(batch) => {
                if let Some(last) = batch.last() {
                    cursor = last.cursor;
                }
                seen.extend(batch);
            }
            Changes::Gap => panic!("unexpected gap after {cursor}"),
        }
    }
    seen
}

/// Every change after `after` that is in the log now.
async fn read_all<S: Store>(store: &S, after: Cursor) -> Vec<Change> {
    let mut cursor = after;
    let mut seen = Vec::new();
    loop {
        match store
            .changes(cursor, 1000, Duration::ZERO)
            .await
            .expect("changes")
        {
            Changes::Changes(batch) if batch.is_empty() => return seen,
            Changes::Changes(batch) => {
                cursor = batch.last().map(|c| c.cursor).unwrap_or(cursor);
                seen.extend(batch);
            }
            Changes::Gap => panic!("unexpected gap after {cursor}"),
        }
    }
}

/// Waits until `cond` holds, polling.
async fn eventually<F: Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let deadline = Instant::now() + DEADLINE;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Removal changes per id.
fn removals(changes: &[Change]) -> HashMap<Ulid, Vec<ChangeKind>> {
    let mut out: HashMap<Ulid, Vec<ChangeKind>> = HashMap::new();
    for c in changes.iter().filter(|c| c.kind.is_removal()) {
        out.entry(c.subject.id()).or_default().push(c.kind);
    }
    out
}

fn assert_increasing(changes: &[Change], after: Cursor) {
    let mut prev = after;
    for c in changes {
        assert!(c.cursor > prev, "cursor {} not after {prev}", c.cursor);
        prev = c.cursor;
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios, generic over the store.

/// A first registration is `registered`, a re-registration `updated`, a deregistration
/// `deregistered` with the record, in that order and with increasing cursors; the head is the
/// last change's cursor, whichever replica asks.
async fn lifecycle_in_order<S: Store>(a: &S, b: &S) {
    let start = a.change_head().await.expect("head");
    let first = a
        .register(reg("http://lifecycle:1", "life"))
        .await
        .expect("register")
        .record;
    let second = b
        .register(reg("http://lifecycle:1", "life-renamed"))
        .await
        .expect("re-register")
        .record;
    assert_eq!(first.id, second.id);
    let removed = a
        .deregister(first.id)
        .await
        .expect("deregister")
        .expect("was there");
    let changes = read_all(b, start).await;
    let kinds: Vec<ChangeKind> = changes.iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds,
        [
            ChangeKind::Registered,
            ChangeKind::Updated,
            ChangeKind::Deregistered
        ],
        "{changes:#?}"
    );
    assert_increasing(&changes, start);
    let records: Vec<_> = changes
        .iter()
        .map(|c| match &c.subject {
            servicekit_orchestrator::store::Subject::Record(r) => (**r).clone(),
            other => panic!("expected a whole record, got {other:?}"),
        })
        .collect();
    assert_eq!(records, [first, second, removed]);
    let head = b.change_head().await.expect("head");
    assert_eq!(Some(head), changes.last().map(|c| c.cursor));
    assert_eq!(a.change_head().await.expect("head"), head);
    // Nothing after the head, and no gap there.
    assert_eq!(
        a.changes(head, 10, Duration::ZERO).await.expect("changes"),
        Changes::Changes(Vec::new())
    );
}

/// The head read before a listing covers what the listing shows: every change up to the head
/// is reflected by a listing started after reading it.
async fn head_then_listing_agree<S: Store>(a: &S, b: &S) {
    let start = a.change_head().await.expect("head");
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            b.register(reg(&format!("http://head:{i}"), "head"))
                .await
                .expect("register")
                .record
                .id,
        );
    }
    b.deregister(ids[0]).await.expect("deregister");
    let head = a.change_head().await.expect("head");
    let listed: Vec<Ulid> = a
        .list(&ListFilter::default())
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect();
    // Apply the changes up to the head to an empty set: the listing is exactly that.
    let mut set = std::collections::BTreeSet::new();
    for c in read_all(a, start).await {
        assert!(c.cursor <= head, "a change beyond the head {head}: {c:?}");
        if c.kind.is_removal() {
            set.remove(&c.subject.id());
        } else {
            set.insert(c.subject.id());
        }
    }
    assert_eq!(listed, set.into_iter().collect::<Vec<_>>());
    // Listings are in id order; ids minted within one millisecond are not in minting order.
    let mut expected = ids[1..].to_vec();
    expected.sort();
    assert_eq!(listed, expected);
}

/// Entries that expire together are each logged `expired` exactly once while two replicas
/// reap concurrently, with what the log knew of them.
async fn expiry_logged_once_by_racing_reapers<S: Store + Clone + 'static>(a: &S, b: &S) {
    const N: usize = 200;
    let start = a.change_head().await.expect("head");
    let mut urls = HashMap::new();
    for i in 0..N {
        let r = a
            .register(reg(&format!("http://expiry:{i}"), "exp"))
            .await
            .expect("register")
            .record;
        urls.insert(r.id, r.url);
    }
    let reapers: Vec<_> = [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .map(|store| {
            tokio::spawn(async move {
                let deadline = Instant::now() + DEADLINE;
                while Instant::now() < deadline {
                    let _ = store.reap().await;
                    if store.count().await.unwrap_or(1) == 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    read_until(b, start, |seen| {
        seen.iter()
            .filter(|c| c.kind == ChangeKind::Expired)
            .count()
            >= N
    })
    .await;
    for reaper in reapers {
        reaper.await.expect("reaper");
    }
    // Read again after the reapers stopped: nothing was logged twice.
    let changes = &read_all(a, start).await;
    let removed = removals(changes);
    assert_eq!(removed.len(), N, "{removed:?}");
    for (id, kinds) in &removed {
        assert_eq!(kinds, &[ChangeKind::Expired], "{id}");
    }
    for c in changes.iter().filter(|c| c.kind == ChangeKind::Expired) {
        assert_eq!(
            Some(c.subject.url()),
            urls.get(&c.subject.id()).map(|u| &**u)
        );
        assert_eq!(c.subject.display_name(), "exp");
    }
    // Back within the binding grace: the same id, announced anew (its removal was logged).
    let head = a.change_head().await.expect("head");
    let back = b
        .register(reg("http://expiry:0", "exp"))
        .await
        .expect("register again")
        .record;
    assert!(urls.contains_key(&back.id), "a fresh id: {back:?}");
    let again = read_all(a, head).await;
    let kinds: Vec<ChangeKind> = again.iter().map(|c| c.kind).collect();
    assert_eq!(kinds, [ChangeKind::Registered]);
}

/// Deregistrations racing with reapers at the moment of expiry: each entry's removal is
/// logged once, as `deregistered` or `expired`.
async fn deregister_racing_reap_logs_one_removal<S: Store + Clone + 'static>(a: &S, b: &S) {
    const N: usize = 100;
    let start = a.change_head().await.expect("head");
    let mut ids = Vec::new();
    let mut expiries = Vec::new();
    for i in 0..N {
        let r = a
            .register(reg(&format!("http://race:{i}"), "race"))
            .await
            .expect("register")
            .record;
        ids.push(r.id);
        expiries.push(r.expires_at.as_millis());
    }
    // Start at the middle entry's expiry, so some deregistrations find their record and some
    // find it expired, while the reapers pick up the same entries.
    let middle = expiries[N / 2];
    let now = servicekit::protocol::Timestamp::now().as_millis();
    tokio::time::sleep(Duration::from_millis(middle.saturating_sub(now))).await;
    let reapers: Vec<_> = [b.clone(), a.clone()]
        .into_iter()
        .map(|store| {
            tokio::spawn(async move {
                let deadline = Instant::now() + DEADLINE;
                while Instant::now() < deadline && store.count().await.unwrap_or(1) > 0 {
                    let _ = store.reap().await;
                }
            })
        })
        .collect();
    let deregistrations: Vec<_> = ids
        .iter()
        .map(|id| {
            let (a, id) = (a.clone(), *id);
            tokio::spawn(async move { a.deregister(id).await.expect("deregister").is_some() })
        })
        .collect();
    let mut deregistered = 0;
    for d in deregistrations {
        if d.await.expect("deregistration") {
            deregistered += 1;
        }
    }
    for reaper in reapers {
        reaper.await.expect("reaper");
    }
    read_until(a, start, |seen| removals(seen).len() >= N).await;
    let changes = &read_all(b, start).await;
    let removed = removals(changes);
    assert_eq!(removed.len(), N);
    let mut logged_deregistered = 0;
    for (id, kinds) in &removed {
        assert_eq!(kinds.len(), 1, "{id}: {kinds:?}");
        if kinds[0] == ChangeKind::Deregistered {
            logged_deregistered += 1;
        }
    }
    // A deregistration that found its record logs it, unless a reaper dropped the entry
    // first (at its expiry instant): never more `deregistered` than deletions.
    assert!(
        logged_deregistered <= deregistered,
        "{logged_deregistered} > {deregistered}"
    );
    eprintln!("{deregistered} deregistered, {logged_deregistered} logged as such");
}

/// A reader waiting at the head on one replica gets a change made through the other.
async fn waiting_reader_sees_other_replica<S: Store + Clone + 'static>(a: &S, b: &S) {
    let head = a.change_head().await.expect("head");
    let reader = {
        let a = a.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let got = a.changes(head, 10, Duration::from_secs(10)).await;
            (got, started.elapsed())
        })
    };
    // Give the reader time to block (it answers an empty batch after the wait otherwise;
    // either way it must not miss the change).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = b
        .register(reg("http://waiter:1", "waiter"))
        .await
        .expect("register")
        .record;
    let (got, waited) = reader.await.expect("reader");
    match got.expect("changes") {
        Changes::Changes(batch) => {
            assert_eq!(batch.len(), 1, "{batch:#?}");
            assert_eq!(batch[0].kind, ChangeKind::Registered);
            assert_eq!(batch[0].subject.id(), r.id);
        }
        Changes::Gap => panic!("gap at the head"),
    }
    assert!(
        waited < Duration::from_secs(10),
        "the reader slept through the change"
    );
    // An empty wait ends with an empty batch, not an error.
    let head = a.change_head().await.expect("head");
    assert_eq!(
        a.changes(head, 10, Duration::from_millis(100))
            .await
            .expect("changes"),
        Changes::Changes(Vec::new())
    );
}

/// More changes than the log keeps: a cursor from before them is a gap; one at the head is
/// not; one beyond the head is a gap.
async fn trimmed_and_future_cursors_are_gaps<S: Store>(a: &S, b: &S, log_len: usize) {
    let zero = a.changes(Cursor::ZERO, 10, Duration::ZERO).await;
    assert!(
        matches!(zero, Ok(Changes::Changes(_))),
        "ZERO on a fresh log: {zero:?}"
    );
    let r = a
        .register(reg("http://trim:1", "trim"))
        .await
        .expect("register")
        .record;
    let early = a.change_head().await.expect("head");
    assert_ne!(early, Cursor::ZERO);
    for _ in 0..log_len * 3 {
        b.register(reg("http://trim:1", "trim"))
            .await
            .expect("re-register");
    }
    assert_eq!(
        b.changes(early, 10, Duration::ZERO).await.expect("changes"),
        Changes::Gap
    );
    assert_eq!(
        b.changes(Cursor::ZERO, 10, Duration::ZERO)
            .await
            .expect("changes"),
        Changes::Gap
    );
    let head = a.change_head().await.expect("head");
    assert_eq!(
        b.changes(head, 10, Duration::ZERO).await.expect("changes"),
        Changes::Changes(Vec::new())
    );
    for beyond in [
        Cursor {
            ms: head.ms,
            seq: head.seq + 1,
        },
        Cursor {
            ms: head.ms + 60_000,
            seq: 0,
        },
        Cursor {
            ms: u64::MAX,
            seq: u64::MAX,
        },
    ] {
        assert_eq!(
            b.changes(beyond, 10, Duration::from_millis(50))
                .await
                .expect("changes"),
            Changes::Gap,
            "{beyond}"
        );
    }
    b.deregister(r.id).await.expect("deregister");
    let batch = b.changes(head, 10, Duration::ZERO).await.expect("changes");
    assert!(
        matches!(&batch, Changes::Changes(v) if v.len() == 1 && v[0].kind == ChangeKind::Deregistered),
        "{batch:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Valkey: two stores (replicas) per test on a valkey-server of the test's own.

struct Valkey {
    a: ValkeyStore,
    b: ValkeyStore,
    server: ValkeyServer,
}

impl Valkey {
    async fn open(ttl: Duration, log_len: usize) -> Valkey {
        let server = tokio::task::spawn_blocking(ValkeyServer::new)
            .await
            .expect("start valkey-server");
        let prefix = format!("test:{}:", Ulid::new());
        let connect = || async {
            ValkeyStore::connect(&server.url(), &prefix, ttl)
                .await
                .expect("connect to valkey-server")
                .with_change_log_len(log_len)
        };
        let (a, b) = (connect().await, connect().await);
        Valkey { a, b, server }
    }
}

const LOG_LEN: usize = servicekit_orchestrator::store::CHANGE_LOG_LEN;

/// Each scenario on each store, as `memory::<name>`, `valkey::<name>` (its own valkey-server)
/// and `cluster::<name>` (the shared cluster: two replicas seeded by different nodes, on a key
/// prefix of the test's own): `name(ttl, log length, extra arguments)`.
macro_rules! scenarios {
    ($($name:ident($ttl:expr, $len:expr $(, $arg:expr)*)),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (a, b) = super::memory($ttl, $len);
                    super::$name(&a, &b $(, $arg)*).await;
                }
            )*
        }
        mod valkey {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let v = Valkey::open($ttl, $len).await;
                    super::$name(&v.a, &v.b $(, $arg)*).await;
                }
            )*
        }
        mod cluster {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let cluster = support::cluster::shared_async().await;
                    let prefix = format!("test:{}:", Ulid::new());
                    let connect = |seed: usize| {
                        let url = cluster.url_seeded_by(seed);
                        let prefix = prefix.clone();
                        async move {
                            ValkeyStore::connect(&url, &prefix, $ttl)
                                .await
                                .expect("connect to the cluster")
                                .with_change_log_len($len)
                        }
                    };
                    let (a, b) = (connect(0).await, connect(1).await);
                    super::$name(&a, &b $(, $arg)*).await;
                }
            )*
        }
    };
}

scenarios!(
    lifecycle_in_order(LONG_TTL, LOG_LEN),
    head_then_listing_agree(LONG_TTL, LOG_LEN),
    expiry_logged_once_by_racing_reapers(SHORT_TTL, LOG_LEN),
    deregister_racing_reap_logs_one_removal(SHORT_TTL, LOG_LEN),
    waiting_reader_sees_other_replica(LONG_TTL, LOG_LEN),
    trimmed_and_future_cursors_are_gaps(LONG_TTL, 10, 100),
);

/// Valkey lost its data (FLUSHALL, a restart without persistence): every cursor but ZERO is
/// a gap, before and after the log is written anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_lost_log_is_a_gap() {
    let v = Valkey::open(LONG_TTL, LOG_LEN).await;
    v.a.register(reg("http://lost:1", "lost"))
        .await
        .expect("register");
    let head = v.a.change_head().await.expect("head");
    assert_eq!(v.server.command(&["FLUSHALL"]), "+OK");
    assert_eq!(v.b.change_head().await.expect("head"), Cursor::ZERO);
    assert_eq!(
        v.b.changes(head, 10, Duration::ZERO)
            .await
            .expect("changes"),
        Changes::Gap
    );
    assert_eq!(
        v.b.changes(Cursor::ZERO, 10, Duration::ZERO)
            .await
            .expect("changes"),
        Changes::Changes(Vec::new())
    );
    // Written anew: the old cursor lies before the new log's first entry.
    v.b.register(reg("http://lost:2", "lost"))
        .await
        .expect("register");
    assert_eq!(
        v.a.changes(head, 10, Duration::ZERO)
            .await
            .expect("changes"),
        Changes::Gap
    );
    let fresh = v.a.changes(Cursor::ZERO, 10, Duration::ZERO).await;
    assert!(
        matches!(&fresh, Ok(Changes::Changes(c)) if c.len() == 1 && c[0].kind == ChangeKind::Registered),
        "{fresh:?}"
    );
}

/// A health change whose log entry failed (the `{all}` slot refused the append after the
/// record was written) is logged by the next report of the same status, once: the record
/// keeps the change pending until the log has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_a_health_change_whose_log_entry_failed_is_logged_by_the_next_report() {
    let v = Valkey::open(LONG_TTL, LOG_LEN).await;
    let events = format!("{}{{all}}:events", v.a.prefix());
    let id =
        v.a.register(reg("http://sick:1", "sick"))
            .await
            .expect("register")
            .record
            .id;
    let admin = Access {
        admin: true,
        ..Access::default()
    };
    let critical = || HealthReport::critical("db down").into_health(Timestamp::now());
    // The stream's key holds a string for a moment: every append fails (WRONGTYPE).
    let saved = format!("{events}:saved");
    assert_eq!(v.server.command(&["RENAME", &events, &saved]), "+OK");
    assert_eq!(v.server.command(&["SET", &events, "not a stream"]), "+OK");
    let failed = v.a.set_health(id, critical(), admin).await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(v.server.command(&["RENAME", &saved, &events]), "+OK");
    let head = v.a.change_head().await.expect("head");
    // The record says critical already; the next report of it still counts as the change.
    let set =
        v.a.set_health(id, critical(), admin)
            .await
            .expect("set")
            .expect("live");
    assert!(set.changed, "the pending change was not logged again");
    let set =
        v.a.set_health(id, critical(), admin)
            .await
            .expect("set")
            .expect("live");
    assert!(!set.changed, "logged twice");
    let Changes::Changes(log) =
        v.a.changes(head, 10, Duration::ZERO)
            .await
            .expect("changes")
    else {
        panic!("a gap after the head")
    };
    let kinds: Vec<(ChangeKind, Ulid)> = log.iter().map(|c| (c.kind, c.subject.id())).collect();
    assert_eq!(kinds, [(ChangeKind::Updated, id)]);
    // Read back, a pending field is the same health.
    let record = v.b.get(id).await.expect("get").expect("live");
    assert_eq!(
        record.health.status,
        servicekit::protocol::HealthStatus::Critical
    );
}

/// A failover that lost the log's last entries (asynchronous replication to the promoted
/// replica), simulated on one server: the `{all}` slot's keys are put back as a replica had
/// them before the last two registrations (`COPY ... REPLACE` keeps a stream's metadata, as
/// replication does). A cursor naming a lost entry is a gap, before the new master logs
/// anything (beyond its head) and after (the entry is gone while newer ids exist: the hole
/// this test is about); a cursor it kept, and its head, stay valid, also when the head's
/// entry itself was deleted by hand (every snapshot starts at the head: refusing it would
/// make readers re-snapshot forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_log_that_goes_back_is_a_gap() {
    let v = Valkey::open(LONG_TTL, LOG_LEN).await;
    let prefix = v.a.prefix().to_owned();
    let keys = ["{all}:events", "{all}:announced", "{all}:idx"].map(|k| format!("{prefix}{k}"));
    v.a.register(reg("http://kept:1", "kept"))
        .await
        .expect("register");
    let kept = v.a.change_head().await.expect("head");
    for key in &keys {
        let replica = format!("{key}:replica");
        assert_eq!(v.server.command(&["COPY", key, &replica]), ":1", "{key}");
    }
    v.a.register(reg("http://lost:1", "lost"))
        .await
        .expect("register");
    let lost_first = v.a.change_head().await.expect("head");
    v.a.register(reg("http://lost:2", "lost"))
        .await
        .expect("register");
    let lost = v.a.change_head().await.expect("head");
    assert!(kept < lost_first && lost_first < lost);
    // The "failover": the {all} slot as the replica had it.
    for key in &keys {
        let replica = format!("{key}:replica");
        assert_eq!(
            v.server.command(&["COPY", &replica, key, "REPLACE"]),
            ":1",
            "{key}"
        );
    }
    assert_eq!(v.b.change_head().await.expect("head"), kept);
    for cursor in [lost_first, lost] {
        assert_eq!(
            v.b.changes(cursor, 10, Duration::ZERO)
                .await
                .expect("changes"),
            Changes::Gap,
            "{cursor}: beyond the new head"
        );
    }
    // The new master's ids come from its clock; on one host that is past the lost ones once
    // a millisecond went by (a failover takes seconds).
    eventually("the server clock to pass the lost entries", || async {
        let now = v.server.command(&[
            "EVAL",
            "local t = redis.call('TIME') return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)",
            "0",
        ]);
        now.trim_start_matches(':').parse::<u64>().expect("TIME") > lost.ms
    })
    .await;
    let after =
        v.b.register(reg("http://after:1", "after"))
            .await
            .expect("register")
            .record;
    let head = v.b.change_head().await.expect("head");
    assert!(head > lost, "{head} after {lost}");
    for cursor in [lost_first, lost] {
        assert_eq!(
            v.a.changes(cursor, 10, Duration::ZERO)
                .await
                .expect("changes"),
            Changes::Gap,
            "{cursor}: lost, with newer entries after it"
        );
    }
    let resumed =
        v.a.changes(kept, 10, Duration::ZERO)
            .await
            .expect("changes");
    assert!(
        matches!(&resumed, Changes::Changes(c) if c.len() == 1
            && c[0].kind == ChangeKind::Registered && c[0].subject.id() == after.id),
        "{resumed:?}"
    );
    assert_eq!(
        v.a.changes(head, 10, Duration::ZERO)
            .await
            .expect("changes"),
        Changes::Changes(Vec::new())
    );
    // The head's own entry deleted by hand: the head stays valid, also once newer entries
    // follow it (nothing after it was deleted).
    let events = &keys[0];
    assert_eq!(v.server.command(&["XDEL", events, &head.to_string()]), ":1");
    assert_eq!(v.b.change_head().await.expect("head"), head);
    assert_eq!(
        v.a.changes(head, 10, Duration::from_millis(50))
            .await
            .expect("changes"),
        Changes::Changes(Vec::new())
    );
    v.b.deregister(after.id).await.expect("deregister");
    let next =
        v.a.changes(head, 10, Duration::ZERO)
            .await
            .expect("changes");
    assert!(
        matches!(&next, Changes::Changes(c) if c.len() == 1 && c[0].kind == ChangeKind::Deregistered),
        "{next:?}"
    );
}

/// A listing that finds an expired record's all-index entry drops it, and logs `expired`
/// (nobody reaps in this test); a reaper afterwards logs nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_listing_drop_logs_expired() {
    let v = Valkey::open(SHORT_TTL, LOG_LEN).await;
    let start = v.a.change_head().await.expect("head");
    let r =
        v.a.register(reg("http://listed:1", "listed"))
            .await
            .expect("register")
            .record;
    eventually("the record to expire", || async {
        v.a.get(r.id).await.expect("get").is_none()
    })
    .await;
    // Leave time for the all-index score (the expiry) to pass by the server clock too.
    eventually("the listing to drop the entry", || async {
        assert!(v
            .b
            .list(&ListFilter::default())
            .await
            .expect("list")
            .is_empty());
        read_all(&v.a, start)
            .await
            .iter()
            .any(|c| c.kind == ChangeKind::Expired)
    })
    .await;
    let changes = read_all(&v.a, start).await;
    let kinds: Vec<ChangeKind> = changes.iter().map(|c| c.kind).collect();
    assert_eq!(kinds, [ChangeKind::Registered, ChangeKind::Expired]);
    assert_eq!(changes[1].subject.id(), r.id);
    assert_eq!(changes[1].subject.url(), "http://listed:1");
    assert_eq!(v.b.reap().await.expect("reap"), 0);
    assert_eq!(read_all(&v.a, start).await.len(), 2);
}

/// A register that died between its record and its announcement (simulated: the
/// announcement and the log removed by hand) is announced again by the record's pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_lost_registration_is_announced_again() {
    let v = Valkey::open(SHORT_TTL, LOG_LEN).await;
    let r =
        v.a.register(reg("http://lost-announce:1", "lost"))
            .await
            .expect("register")
            .record;
    let prefix = v.a.prefix().to_owned();
    let announced = format!("{prefix}{{all}}:announced");
    let events = format!("{prefix}{{all}}:events");
    assert_eq!(
        v.server.command(&["HDEL", &announced, &r.id.to_string()]),
        ":1"
    );
    assert_eq!(v.server.command(&["DEL", &events]), ":1");
    eventually("the entry to be announced again", || async {
        v.a.ping(r.id).await.expect("ping").expect("alive");
        v.b.reap().await.expect("reap");
        !read_all(&v.b, Cursor::ZERO).await.is_empty()
    })
    .await;
    let changes = read_all(&v.b, Cursor::ZERO).await;
    assert_eq!(changes.len(), 1, "{changes:#?}");
    assert_eq!(changes[0].kind, ChangeKind::Registered);
    assert_eq!(changes[0].subject.id(), r.id);
}

// ---------------------------------------------------------------------------------------
// Memory: two clones of one store (they share everything, as two handles of one process).

fn memory(ttl: Duration, log_len: usize) -> (MemoryStore, MemoryStore) {
    let a = MemoryStore::new(ttl).with_change_log_len(log_len);
    (a.clone(), a)
}

/// An orchestrator on the memory store restarted: a cursor the old process handed out is a
/// gap for the new one (its log never held those changes), once the new log has changes of
/// its own as well as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_cursor_of_a_previous_process_is_a_gap() {
    let (old, _) = memory(LONG_TTL, LOG_LEN);
    old.register(reg("http://before:1", "restart"))
        .await
        .expect("register");
    let old_head = old.change_head().await.expect("head");
    let (new, _) = memory(LONG_TTL, LOG_LEN);
    assert_eq!(
        new.changes(old_head, 10, Duration::ZERO)
            .await
            .expect("changes"),
        Changes::Gap,
        "an empty log"
    );
    // The new process's first change comes in a later millisecond than the old cursor.
    eventually("the clock to pass the old cursor", || async {
        servicekit::protocol::Timestamp::now().as_millis() > old_head.ms
    })
    .await;
    new.register(reg("http://after:1", "restart"))
        .await
        .expect("register");
    assert_eq!(
        new.changes(old_head, 10, Duration::ZERO)
            .await
            .expect("changes"),
        Changes::Gap,
        "a log with changes of its own"
    );
    assert!(matches!(
        new.changes(Cursor::ZERO, 10, Duration::ZERO).await,
        Ok(Changes::Changes(c)) if c.len() == 1
    ));
}
