//! The watch feed across a failover of the `{all}` slot's master on a real local Valkey
//! Cluster (six nodes), with three in-process orchestrator replicas.
//!
//! Replication is asynchronous, so a failover may lose the change log's last entries. The
//! test makes that loss certain instead of lucky: before the kill it cuts the `{all}`
//! master's replica off its replication link (a `masterauth` its master refuses), so the
//! registrations that follow reach the master, and every watcher, but never the replica that
//! takes over. Every watcher's cursor then names a lost entry. What must hold: each live
//! watcher gets a fresh `snapshot` after the failover and events after it, a watcher that
//! resumes with a lost `Last-Event-ID` gets a snapshot, one that resumes with a cursor the
//! failover kept gets just the events it missed, and once writes stop every watcher's state
//! (snapshot + events applied) is the list answer. Without the change log's "the cursor's
//! entry must still be there" rule, the watchers go on past the lost entries and keep the
//! lost registrations that the list no longer has.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use support::cluster::ValkeyCluster;
use support::http::Api;
use support::replicas::start;
use support::sse::{Failure, Item, SseStream};
use tokio::time::Instant;

/// Recovery the issue asks for: every orchestrator serves again within this of a kill.
const RECOVERY: Duration = Duration::from_secs(10);
/// How long anything else that should happen may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);
/// How long a watcher waits for the next item before it counts the connection dead (the
/// feed sends a heartbeat after 10 s of silence).
const SILENCE: Duration = Duration::from_secs(20);

/// What one watcher holds: its records (id → URL) after applying every event in order, and
/// what happened on the way.
#[derive(Debug, Default)]
struct Feed {
    records: BTreeMap<String, String>,
    /// The id of the last event.
    last_id: Option<String>,
    /// When each snapshot arrived.
    snapshots: Vec<Instant>,
    /// When each change event arrived.
    changes: Vec<Instant>,
    /// Connections that broke or ended and were opened again.
    reconnects: usize,
    /// Watch requests answered with something else than 200 (a 503 while the store is away).
    refused: usize,
}

impl Feed {
    /// Applies one event as a client does: replace on `snapshot`, upsert on `registered` /
    /// `updated`, remove on `deregistered` / `expired`.
    fn apply(&mut self, event: &support::sse::Event) {
        let data = event.json();
        match event.event.as_str() {
            "snapshot" => {
                self.records = data["services"]
                    .as_array()
                    .expect("services")
                    .iter()
                    .map(record_entry)
                    .collect();
                self.snapshots.push(Instant::now());
            }
            "registered" | "updated" => {
                let (id, url) = record_entry(&data);
                self.records.insert(id, url);
                self.changes.push(Instant::now());
            }
            "deregistered" | "expired" => {
                self.records.remove(data["id"].as_str().expect("id"));
                self.changes.push(Instant::now());
            }
            other => panic!("unexpected event {other:?}: {event:?}"),
        }
        self.last_id = Some(event.id().to_owned());
    }

    fn snapshots_since(&self, t: Instant) -> usize {
        self.snapshots.iter().filter(|&&s| s >= t).count()
    }

    fn changes_since(&self, t: Instant) -> usize {
        self.changes.iter().filter(|&&c| c >= t).count()
    }
}

/// Whether the watcher's state is `expected`; panics when its task ended or the deadline
/// passed.
fn state_matches(
    feed: &Mutex<Feed>,
    expected: &BTreeMap<String, String>,
    replica: usize,
    deadline: Instant,
    task: &tokio::task::JoinHandle<()>,
) -> bool {
    let f = lock(feed);
    if f.records == *expected {
        return true;
    }
    assert!(
        !task.is_finished(),
        "the watcher task on replica {replica} ended (panicked)"
    );
    assert!(
        Instant::now() < deadline,
        "watcher on replica {replica} never matched the list:\n  watcher {:?}\n  list    {:?}",
        f.records,
        expected
    );
    false
}

fn record_entry(record: &Value) -> (String, String) {
    (
        record["id"].as_str().expect("id").to_owned(),
        record["url"].as_str().expect("url").to_owned(),
    )
}

/// Opens `GET /services?watch=true` (with `Last-Event-ID` when given) until it answers 200,
/// and reads the `retry:` hint.
async fn open_watch(addr: SocketAddr, last_id: Option<&str>, feed: &Mutex<Feed>) -> SseStream {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let headers: Vec<(&str, &str)> = last_id
            .map(|id| ("last-event-id", id))
            .into_iter()
            .collect();
        let mut s = SseStream::open(addr, "/services?watch=true", &headers).await;
        if s.status == 200 {
            assert_eq!(
                s.next(DEADLINE).await.expect("retry hint"),
                Some(Item::Retry(2000))
            );
            return s;
        }
        lock(feed).refused += 1;
        if Instant::now() >= deadline {
            let status = s.status;
            panic!(
                "the watch was refused for {DEADLINE:?}: {status} {}",
                s.text(DEADLINE).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn lock(feed: &Mutex<Feed>) -> std::sync::MutexGuard<'_, Feed> {
    feed.lock().unwrap_or_else(|e| e.into_inner())
}

/// A watcher as an SSE client behaves: applies what arrives and, when the connection breaks
/// or ends, opens it again with `Last-Event-ID`. Runs until aborted.
async fn watch_forever(addr: SocketAddr, feed: Arc<Mutex<Feed>>) {
    let mut stream = open_watch(addr, None, &feed).await;
    loop {
        match stream.next(SILENCE).await {
            Ok(Some(Item::Event(event))) => lock(&feed).apply(&event),
            Ok(Some(_)) => {}
            Ok(None) | Err(Failure::Broken(_)) => {
                let last = {
                    let mut f = lock(&feed);
                    f.reconnects += 1;
                    f.last_id.clone()
                };
                tokio::time::sleep(Duration::from_millis(100)).await;
                stream = open_watch(addr, last.as_deref(), &feed).await;
            }
            Err(Failure::Timeout) => panic!("the feed on {addr} went silent for {SILENCE:?}"),
        }
    }
}

/// Reads `stream` into `feed` until `done` holds for it.
async fn read_until(stream: &mut SseStream, feed: &Mutex<Feed>, done: impl Fn(&Feed) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done(&lock(feed)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = stream.next_event(left).await;
        lock(feed).apply(&event);
    }
}

/// The list answer through `api` (id → URL), retried over 503s.
async fn list(api: &Api) -> BTreeMap<String, String> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let r = api.get("/services").await;
        if r.status == 200 {
            let answer: Value = r.json();
            return answer["services"]
                .as_array()
                .expect("services")
                .iter()
                .map(record_entry)
                .collect();
        }
        assert!(r.status == 503 && Instant::now() < deadline, "list: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registers `url` through `api`, retrying a 503 (the failover); its id.
async fn register(api: &Api, url: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let r = api
            .post_json(
                "/services/$register",
                &json!({"url": url, "info": {"display_name": "watched"}}),
            )
            .await;
        if r.status.is_success() {
            return r.json::<Value>()["id"].as_str().expect("id").to_owned();
        }
        assert!(
            r.status == 503 && Instant::now() < deadline,
            "register {url}: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deregisters `id` through `api`, retrying a 503; a 404 is fine (a failover may have lost
/// the record).
async fn deregister(api: &Api, id: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let r = api.delete(&format!("/services/{id}")).await;
        if r.status.is_success() || r.status == 404 {
            return;
        }
        assert!(
            r.status == 503 && Instant::now() < deadline,
            "deregister {id}: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_on_every_replica_survive_a_failover_that_lost_the_log_tail() {
    // RUST_LOG=servicekit_orchestrator=warn shows the hubs' failed reads and their backoff.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut cluster = ValkeyCluster::new();
    let prefix = format!("test:{}:", ulid::Ulid::new());
    let events_key = format!("{prefix}{{all}}:events");
    let master = cluster.master_of_key(&events_key);
    // Three replicas, each seeded by a different master (one of them the one killed below).
    let mut orchestrators = Vec::new();
    for seed in cluster.masters() {
        orchestrators.push(start(cluster.url_seeded_by(seed), &prefix).await);
    }
    let apis: Vec<&Api> = orchestrators.iter().map(|(_, api)| api).collect();
    let addrs: Vec<SocketAddr> = orchestrators.iter().map(|(r, _)| r.local_addr()).collect();

    // A live watcher on every replica, and two that will leave and resume (on replica 0).
    let feeds: Vec<Arc<Mutex<Feed>>> = addrs.iter().map(|_| Arc::default()).collect();
    let watchers: Vec<_> = addrs
        .iter()
        .zip(&feeds)
        .map(|(&addr, feed)| tokio::spawn(watch_forever(addr, feed.clone())))
        .collect();
    let kept_feed = Mutex::new(Feed::default());
    let mut kept_stream = open_watch(addrs[0], None, &kept_feed).await;
    let lost_feed = Mutex::new(Feed::default());
    let mut lost_stream = open_watch(addrs[1], None, &lost_feed).await;

    // Before: registrations through every replica, replicated.
    let mut ids = Vec::new();
    for i in 0..12 {
        let api = apis[i % apis.len()];
        ids.push(register(api, &format!("http://10.1.0.{i}:80")).await);
    }
    let before = list(apis[0]).await;
    assert_eq!(before.len(), 12);
    read_until(&mut kept_stream, &kept_feed, |f| f.records == before).await;
    read_until(&mut lost_stream, &lost_feed, |f| f.records == before).await;
    // The kept watcher leaves here: its cursor is in what the replica has.
    drop(kept_stream);
    let kept_cursor = lock(&kept_feed).last_id.clone().expect("an event id");
    let replica = tokio::task::block_in_place(|| cluster.cut_replication(master));

    // The tail the failover will lose: registrations every watcher sees.
    for i in 0..6 {
        let api = apis[i % apis.len()];
        register(api, &format!("http://10.2.0.{i}:80")).await;
    }
    let with_tail = list(apis[0]).await;
    assert_eq!(with_tail.len(), 18);
    read_until(&mut lost_stream, &lost_feed, |f| f.records == with_tail).await;
    drop(lost_stream);
    let lost_cursor = lock(&lost_feed).last_id.clone().expect("an event id");
    for feed in &feeds {
        let deadline = Instant::now() + DEADLINE;
        while lock(feed).records != with_tail {
            assert!(Instant::now() < deadline, "a watcher missed the tail");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    cluster.kill(master);
    let killed = Instant::now();

    // After: writes through every replica while the cluster fails over and after.
    let first = register(apis[0], "http://10.3.0.0:80").await;
    eprintln!(
        "first write after the kill went through after {:?}",
        killed.elapsed()
    );
    assert!(killed.elapsed() <= RECOVERY, "took {:?}", killed.elapsed());
    // The hubs notice the lost tail on their first read after the failover and send every
    // session a fresh snapshot; the writes below come after it, so each watcher must get
    // them as events (a write before the snapshot would only be in it).
    for (i, feed) in feeds.iter().enumerate() {
        let deadline = Instant::now() + DEADLINE;
        while lock(feed).snapshots_since(killed) == 0 {
            assert!(
                Instant::now() < deadline && !watchers[i].is_finished(),
                "watcher on replica {i}: no fresh snapshot after a failover that lost its cursor"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut after = vec![first];
    for i in 1..9 {
        let api = apis[i % apis.len()];
        after.push(register(api, &format!("http://10.3.0.{i}:80")).await);
        deregister(apis[(i + 1) % apis.len()], &ids[i]).await;
    }
    deregister(apis[2], &after[0]).await;
    tokio::task::block_in_place(|| cluster.wait_ok());
    let new_master = cluster.master_of_key(&events_key);
    assert_eq!(new_master, replica, "the cut-off replica took over");
    assert_eq!(
        cluster
            .cli_on(
                new_master,
                &["XRANGE", &events_key, &lost_cursor, &lost_cursor]
            )
            .trim(),
        "",
        "the failover was meant to lose {lost_cursor}"
    );
    assert_ne!(
        cluster
            .cli_on(
                new_master,
                &["XRANGE", &events_key, &kept_cursor, &kept_cursor]
            )
            .trim(),
        "",
        "the failover was meant to keep {kept_cursor}"
    );

    // Writes have stopped: every watcher's state is the list answer of its replica.
    let expected = list(apis[0]).await;
    for api in &apis[1..] {
        assert_eq!(list(api).await, expected, "replicas disagree");
    }
    assert!(
        expected
            .keys()
            .all(|id| !with_tail.contains_key(id) || before.contains_key(id)),
        "the lost registrations are not listed"
    );
    for (i, feed) in feeds.iter().enumerate() {
        let deadline = Instant::now() + DEADLINE;
        while !state_matches(feed, &expected, i, deadline, &watchers[i]) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let metrics = apis[i].get("/metrics").await;
        let text = String::from_utf8_lossy(&metrics.body).into_owned();
        let by_reason: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("servicekit_watch_snapshots_total{"))
            .collect();
        let f = lock(feed);
        let snapshot_at = f
            .snapshots
            .iter()
            .find(|&&s| s >= killed)
            .map(|&s| s - killed);
        eprintln!(
            "watcher on replica {i}: snapshot {:?} after the kill, {} changes after it, {} reconnects, {} refused\n  {}",
            snapshot_at,
            f.changes_since(killed),
            f.reconnects,
            f.refused,
            by_reason.join("\n  ")
        );
        assert!(
            f.snapshots_since(killed) >= 1,
            "watcher on replica {i}: no fresh snapshot after a failover that lost its cursor"
        );
        assert!(
            f.changes_since(killed) >= 1,
            "watcher on replica {i}: no events after the failover"
        );
    }

    // The watcher whose cursor was lost resumes with it: a snapshot, then the list.
    let mut resumed = open_watch(addrs[1], Some(&lost_cursor), &lost_feed).await;
    let first_event = resumed.next_event(DEADLINE).await;
    assert_eq!(
        first_event.event, "snapshot",
        "a Last-Event-ID the failover lost must not resume: {first_event:?}"
    );
    lock(&lost_feed).apply(&first_event);
    assert_eq!(lock(&lost_feed).records, expected);

    // The watcher whose cursor the failover kept resumes with just what it missed.
    let mut resumed = open_watch(addrs[0], Some(&kept_cursor), &kept_feed).await;
    read_until(&mut resumed, &kept_feed, |f| f.records == expected).await;
    assert_eq!(
        lock(&kept_feed).snapshots.len(),
        1,
        "a Last-Event-ID the failover kept resumes without a snapshot"
    );

    for watcher in &watchers {
        assert!(!watcher.is_finished(), "a watcher task ended (panicked)");
        watcher.abort();
    }
    for (running, _) in orchestrators {
        running.shutdown().await;
    }
}
