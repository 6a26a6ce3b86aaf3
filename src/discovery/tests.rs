//! The discovery module against a hand-written watch feed (the COMMON wire contract) and real
//! hyper servers, over real sockets on 127.0.0.1.

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tower::discover::Change;
use ulid::Ulid;

use super::*;
use crate::config::ConfigError;
use crate::protocol::{Health, HealthStatus, ServiceInfo, ServiceRecord, Timestamp};

const DEADLINE: Duration = Duration::from_secs(10);

/// Aborts a task when dropped, so a failing test leaves no server behind.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits for `cond` with a deadline, checking every few milliseconds.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn record(id: Ulid, url: &str) -> ServiceRecord {
    ServiceRecord {
        id,
        url: url.to_owned(),
        info: ServiceInfo::new("svca"),
        registered_at: Timestamp::from_millis(1),
        last_updated: Timestamp::from_millis(1),
        last_ping_at: Timestamp::from_millis(1),
        expires_at: Timestamp::from_millis(30_001),
        health: Default::default(),
        check: None,
    }
}

fn snapshot(id: &str, records: &[&ServiceRecord]) -> String {
    let list = serde_json::json!({"services": records, "count": records.len()});
    format!("id: {id}\nevent: snapshot\ndata: {list}\n\n")
}

fn event(id: &str, kind: &str, record: &ServiceRecord) -> String {
    let data = if kind == "deregistered" || kind == "expired" {
        serde_json::to_string(&crate::protocol::RemovedService::from(record))
    } else {
        serde_json::to_string(record)
    };
    format!("id: {id}\nevent: {kind}\ndata: {}\n\n", data.unwrap())
}

/// A hand-written watch feed: hands each accepted connection, with its request head, to the
/// test, which writes what it wants.
struct Feed {
    url: String,
    conns: mpsc::UnboundedReceiver<FeedConn>,
    _task: Task,
}

struct FeedConn {
    head: String,
    stream: TcpStream,
}

impl Feed {
    async fn start() -> Feed {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, conns) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                if tx.send(FeedConn { head, stream }).is_err() {
                    return;
                }
            }
        });
        Feed {
            url,
            conns,
            _task: Task(task),
        }
    }

    async fn accept(&mut self) -> FeedConn {
        within("a connection to the feed", self.conns.recv())
            .await
            .expect("the feed's acceptor ended")
    }
}

impl FeedConn {
    /// Answers 200 with an event stream (read until the connection closes).
    async fn ok(&mut self) {
        self.send("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\n\r\nretry: 10\n\n")
            .await;
    }

    async fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).await.unwrap();
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_owned())
        })
    }
}

fn watcher(feed: &Feed) -> WatcherBuilder {
    Watcher::builder(Filter::display_name("svca"))
        .url(format!("{}/services/$register", feed.url))
        .backoff(Duration::from_millis(5), Duration::from_millis(50))
}

fn urls(w: &Watcher) -> Vec<String> {
    w.instances().into_iter().map(|i| i.url).collect()
}

fn ids() -> [Ulid; 5] {
    let base = Ulid::from_parts(1_700_000_000_000, 1);
    [0, 1, 2, 3, 4].map(|n| Ulid::from_parts(1_700_000_000_000 + n, base.random()))
}

/// The next change of a discover stream, as text (`+url` for an insert, `-id` for a removal).
async fn next_change(changes: &mut Changes) -> String {
    match within("a change", changes.next()).await {
        Some(Ok(Change::Insert(_, i))) => format!("+{}", i.url),
        Some(Ok(Change::Remove(id))) => format!("-{id}"),
        None => panic!("the stream ended"),
    }
}

#[test]
fn handles_have_the_promised_auto_traits() {
    fn send_unpin<T: Send + Unpin + 'static>() {}
    fn send_sync_clone<T: Send + Sync + Clone + 'static>() {}
    send_unpin::<Changes>();
    send_sync_clone::<Watcher>();
    send_sync_clone::<BalancedClient>();
}

#[tokio::test]
async fn the_cache_follows_the_feed_through_reconnects_and_outages() {
    let mut feed = Feed::start().await;
    let w = watcher(&feed).build().unwrap();
    let [a, b, c, d, e] = ids();
    let (ra, rb, rc, rd, re) = (
        record(a, "http://a:1"),
        record(b, "http://b:1"),
        record(c, "http://c:1"),
        record(d, "http://d:1"),
        record(e, "http://e:1"),
    );

    let mut conn = feed.accept().await;
    assert!(
        conn.head
            .starts_with("get /services?watch=true&display_name=svca http/1.1"),
        "{}",
        conn.head
    );
    assert_eq!(conn.header("accept").as_deref(), Some("text/event-stream"));
    assert_eq!(conn.header("last-event-id"), None);
    assert_eq!(w.state(), WatchState::Connecting);
    conn.ok().await;
    conn.send(&snapshot("1-0", &[&ra, &rb])).await;
    within("the first snapshot", w.synced()).await;
    assert_eq!(urls(&w), ["http://a:1", "http://b:1"]);
    assert_eq!(w.state(), WatchState::Live);

    let mut changes = w.discover();
    assert_eq!(next_change(&mut changes).await, "+http://a:1");
    assert_eq!(next_change(&mut changes).await, "+http://b:1");

    // Events, split across writes at odd places, with an unknown event and a removal of an
    // unknown id in between.
    let rb2 = record(b, "http://b:2");
    let text = [
        event("2-0", "registered", &rc),
        event("3-0", "deregistered", &ra),
        event("4-0", "expired", &record(Ulid::new(), "http://x:1")),
        "id: 5-0\nevent: bogus\ndata: {}\n\n".to_owned(),
        event("6-0", "updated", &rb2),
        ": heartbeat\n".to_owned(),
    ]
    .concat();
    let (x, y) = text.split_at(text.len() / 3);
    conn.send(x).await;
    conn.send(y).await;
    assert_eq!(next_change(&mut changes).await, "+http://c:1");
    assert_eq!(next_change(&mut changes).await, format!("-{a}"));
    assert_eq!(next_change(&mut changes).await, "+http://b:2");
    assert_eq!(urls(&w), ["http://b:2", "http://c:1"]);

    // The connection breaks: the cache is kept, stale; the watcher resumes from the last id.
    drop(conn);
    wait_until("the cache is stale", || w.state() == WatchState::Stale).await;
    assert_eq!(urls(&w), ["http://b:2", "http://c:1"]);
    let mut conn = feed.accept().await;
    assert_eq!(conn.header("last-event-id").as_deref(), Some("6-0"));
    // Resumed: no snapshot, the missed events only.
    conn.ok().await;
    wait_until("live again", || w.state() == WatchState::Live).await;
    conn.send(&event("7-0", "registered", &rd)).await;
    assert_eq!(next_change(&mut changes).await, "+http://d:1");

    // An outage: connections fail, the cache keeps serving.
    drop(conn);
    for _ in 0..3 {
        let conn = feed.accept().await;
        assert_eq!(conn.header("last-event-id").as_deref(), Some("7-0"));
        drop(conn);
    }
    assert_eq!(w.state(), WatchState::Stale);
    assert_eq!(urls(&w), ["http://b:2", "http://c:1", "http://d:1"]);

    // Back with a fresh snapshot (the orchestrator lost the log): only the difference reaches
    // subscribers.
    let mut conn = feed.accept().await;
    conn.ok().await;
    conn.send(&snapshot("9-0", &[&rb2, &rd, &re])).await;
    assert_eq!(next_change(&mut changes).await, format!("-{c}"));
    assert_eq!(next_change(&mut changes).await, "+http://e:1");
    assert_eq!(urls(&w), ["http://b:2", "http://d:1", "http://e:1"]);
    assert_eq!(w.state(), WatchState::Live);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), changes.next())
            .await
            .is_err(),
        "an unchanged instance was announced again"
    );
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_task() {
    let mut feed = Feed::start().await;
    let w = watcher(&feed).build().unwrap();
    let changes = w.discover();
    let mut conn = feed.accept().await;
    conn.ok().await;
    drop(w);
    // A discover stream keeps the task: the connection stays open.
    conn.send(&snapshot("1-0", &[])).await;
    drop(changes);
    let mut buf = [0u8; 64];
    let n = within(
        "the watcher closes its connection",
        conn.stream.read(&mut buf),
    )
    .await
    .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_silent_feed_counts_as_dead() {
    let mut feed = Feed::start().await;
    let w = watcher(&feed)
        .idle_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let mut conn = feed.accept().await;
    conn.ok().await;
    conn.send(&snapshot("1-0", &[])).await;
    within("the first snapshot", w.synced()).await;
    // The connection stays open but silent: the watcher must give up on it and reconnect.
    let again = feed.accept().await;
    assert_eq!(again.header("last-event-id").as_deref(), Some("1-0"));
    assert_eq!(w.state(), WatchState::Stale);
    drop(conn);
}

#[tokio::test]
async fn the_retry_hint_is_a_floor() {
    let mut feed = Feed::start().await;
    let w = watcher(&feed).build().unwrap();
    let mut conn = feed.accept().await;
    conn.ok().await;
    conn.send("retry: 300\n\n").await;
    conn.send(&snapshot("1-0", &[])).await;
    within("the first snapshot", w.synced()).await;
    let dropped = tokio::time::Instant::now();
    drop(conn);
    let _again = feed.accept().await;
    // The watcher's own backoff is at most 50 ms here: only the hint explains the wait.
    assert!(
        dropped.elapsed() >= Duration::from_millis(300),
        "{:?}",
        dropped.elapsed()
    );
}

#[tokio::test]
async fn an_unreadable_event_forces_a_fresh_snapshot() {
    let mut feed = Feed::start().await;
    let w = watcher(&feed).build().unwrap();
    let mut conn = feed.accept().await;
    conn.ok().await;
    conn.send(&snapshot("1-0", &[])).await;
    within("the first snapshot", w.synced()).await;
    conn.send("id: 2-0\nevent: registered\ndata: {\"id\":42}\n\n")
        .await;
    let again = feed.accept().await;
    assert_eq!(again.header("last-event-id"), None);
}

#[tokio::test]
async fn a_lagging_subscriber_rediffs_against_the_cache() {
    let mut feed = Feed::start().await;
    let w = watcher(&feed).changes_capacity(2).build().unwrap();
    let mut changes = w.discover();
    let records: Vec<ServiceRecord> = (0..10)
        .map(|n| record(Ulid::new(), &format!("http://s{n}:1")))
        .collect();
    let mut conn = feed.accept().await;
    conn.ok().await;
    conn.send(&snapshot("1-0", &records.iter().collect::<Vec<_>>()))
        .await;
    for (n, r) in records.iter().take(3).enumerate() {
        conn.send(&event(&format!("{}-0", n + 2), "deregistered", r))
            .await;
    }
    wait_until("the removals are applied", || w.instances().len() == 7).await;
    // Ten inserts and three removals went by a subscriber that can hold two: it reports the
    // current set, each instance once, and nothing that is gone.
    let mut seen = HashSet::new();
    while seen.len() < 7 {
        let change = next_change(&mut changes).await;
        assert!(change.starts_with('+'), "{change}");
        assert!(seen.insert(change.clone()), "{change} twice");
    }
    let want: HashSet<String> = records[3..].iter().map(|r| format!("+{}", r.url)).collect();
    assert_eq!(seen, want);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), changes.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn configuration_mistakes_are_typed_errors() {
    let err = Watcher::new("ftp://o:9000", Filter::all()).unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    let err = Watcher::new("http://user:secret@o:9000", Filter::all()).unwrap_err();
    assert!(!format!("{err:?}").contains("secret"));
    let builder = Watcher::builder(Filter::all()).url("http://user:secret@o:9000");
    assert!(!format!("{builder:?}").contains("secret"));
}

#[test]
fn a_watcher_needs_a_runtime() {
    let err = Watcher::new("http://o:9000", Filter::all()).unwrap_err();
    assert!(matches!(err, Error::NoRuntime), "{err:?}");
}

// --- BalancedClient against real hyper servers ---

/// A real HTTP server answering its name; killing it closes its listener and every
/// connection.
struct Backend {
    addr: SocketAddr,
    name: &'static str,
    hits: Arc<AtomicUsize>,
    task: Option<Task>,
}

impl Backend {
    async fn start(name: &'static str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut b = Backend {
            addr,
            name,
            hits: Arc::new(AtomicUsize::new(0)),
            task: None,
        };
        b.serve(listener);
        b
    }

    fn serve(&mut self, listener: TcpListener) {
        let (hits, name) = (self.hits.clone(), self.name);
        self.task = Some(Task(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let hits = hits.clone();
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let body = format!("{name} {} {}", req.method(), req.uri());
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                });
                conns.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        })));
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn kill(&mut self) {
        self.task = None;
    }

    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A server that takes each request and closes the connection without answering (what an
/// instance killed mid-request looks like); counts the requests.
async fn closer() -> (String, Arc<AtomicUsize>, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            if let Ok(n) = stream.read(&mut buf).await {
                if n > 0 {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    });
    (url, count, Task(task))
}

/// A watcher fed one snapshot of `urls`; the feed connection stays open.
async fn watching(urls: &[&str]) -> (Watcher, Feed, FeedConn, Vec<ServiceRecord>) {
    let mut feed = Feed::start().await;
    let w = watcher(&feed).build().unwrap();
    let records: Vec<ServiceRecord> = urls.iter().map(|u| record(Ulid::new(), u)).collect();
    let mut conn = feed.accept().await;
    conn.ok().await;
    conn.send(&snapshot("1-0", &records.iter().collect::<Vec<_>>()))
        .await;
    within("the first snapshot", w.synced()).await;
    (w, feed, conn, records)
}

fn body_text(res: &Response<Bytes>) -> String {
    String::from_utf8_lossy(res.body()).into_owned()
}

#[tokio::test]
async fn requests_spread_over_the_instances() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let prefixed = format!("{}/prefix/", b.url());
    let (w, _feed, _conn, _) = watching(&[&a.url(), &prefixed]).await;
    let client = BalancedClient::new(w);
    let mut served = HashSet::new();
    for _ in 0..40 {
        let res = client.get("/hello?x=1").await.unwrap();
        assert_eq!(res.status(), 200);
        let by = res.extensions().get::<ServedBy>().unwrap().url.clone();
        let text = body_text(&res);
        if by == prefixed {
            assert_eq!(text, "b GET /prefix/hello?x=1");
        } else {
            assert_eq!(text, "a GET /hello?x=1");
        }
        served.insert(by);
    }
    assert_eq!(served.len(), 2, "{served:?}");
    assert!(a.hits() > 0 && b.hits() > 0);
    let err = client.get("http://elsewhere/x").await.unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(_)), "{err:?}");
}

#[tokio::test]
async fn a_killed_instance_costs_no_idempotent_request() {
    let mut a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (w, _feed, _conn, _) = watching(&[&a.url(), &b.url()]).await;
    let client = BalancedClient::new(w);
    // Warm both up (pooled connections to a included).
    for _ in 0..10 {
        client.get("/").await.unwrap();
    }
    a.kill();
    // The orchestrator still lists a: every request must still succeed.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let client = client.clone();
        tasks.spawn(async move { client.get("/").await.map(|r| body_text(&r)) });
    }
    let mut failed = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.unwrap() {
            failed.push(e.to_string());
        }
    }
    assert_eq!(failed, Vec::<String>::new());
    assert!(b.hits() >= 50);
}

#[tokio::test]
async fn only_idempotent_requests_are_retried_and_on_another_instance() {
    let (bad, bad_count, _bad) = closer().await;
    let good = Backend::start("good").await;
    let (w, _feed, _conn, _) = watching(&[&bad, &good.url()]).await;
    // Never eject, so the balancer keeps choosing the failing instance.
    let client = BalancedClient::builder(w)
        .eject_after(1000)
        .build()
        .unwrap();
    for _ in 0..20 {
        let res = client.get("/").await.unwrap();
        assert_eq!(body_text(&res), "good GET /");
    }
    assert!(
        bad_count.load(Ordering::SeqCst) > 0,
        "the closer was never chosen"
    );
    let before = bad_count.load(Ordering::SeqCst);
    let mut failed = 0;
    for _ in 0..20 {
        let req = Request::builder()
            .method(Method::POST)
            .uri("/orders")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        match client.send(req).await {
            Ok(res) => assert_eq!(res.status(), 200),
            Err(Error::Transport {
                attempts, instance, ..
            }) => {
                assert_eq!(attempts, 1);
                assert_eq!(instance, bad);
                failed += 1;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(failed > 0, "no POST reached the closer");
    assert_eq!(bad_count.load(Ordering::SeqCst) - before, failed);
}

#[tokio::test]
async fn an_instance_that_keeps_failing_is_ejected() {
    let (bad, bad_count, _bad) = closer().await;
    let good = Backend::start("good").await;
    let (w, _feed, _conn, _) = watching(&[&bad, &good.url()]).await;
    let client = BalancedClient::builder(w)
        .eject_after(2)
        .eject_cooldown(Duration::from_secs(3600))
        .build()
        .unwrap();
    while !client.is_ejected(&bad) {
        client.get("/").await.unwrap();
    }
    let before = bad_count.load(Ordering::SeqCst);
    for _ in 0..30 {
        client.get("/").await.unwrap();
    }
    assert_eq!(
        bad_count.load(Ordering::SeqCst),
        before,
        "an ejected instance got requests"
    );
}

#[tokio::test]
async fn no_instance_is_a_typed_error_within_the_wait() {
    let (w, _feed, _conn, _) = watching(&[]).await;
    let client = BalancedClient::builder(w)
        .ready_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let err = within("the bounded wait", client.get("/"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoInstance { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "no instance of display_name=svca ready within 100ms"
    );
}

/// Kills `a`, sends requests until the client ejects it, then starts it again.
async fn eject_then_restart(client: &BalancedClient, a: &mut Backend) {
    a.kill();
    while !client.is_ejected(&a.url()) {
        client.get("/").await.unwrap();
    }
    a.restart().await;
}

/// Sends requests until `a` answers one.
async fn gets_traffic_again(client: &BalancedClient, a: &Backend) {
    within("a gets traffic again", async {
        while a.hits() == 0 {
            client.get("/").await.unwrap();
        }
    })
    .await;
}

#[tokio::test]
async fn an_ejected_instance_returns_after_the_cooldown() {
    let mut a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (w, _feed, _conn, _) = watching(&[&a.url(), &b.url()]).await;
    let client = BalancedClient::builder(w)
        .eject_cooldown(Duration::from_millis(300))
        .build()
        .unwrap();
    let url = a.url();
    eject_then_restart(&client, &mut a).await;
    // Readmitted with the first request after the cooldown.
    gets_traffic_again(&client, &a).await;
    assert!(!client.is_ejected(&url));
}

#[tokio::test]
async fn an_ejected_instance_returns_when_discovery_shows_it_again() {
    let mut a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (w, _feed, mut conn, records) = watching(&[&a.url(), &b.url()]).await;
    let client = BalancedClient::builder(w)
        .eject_cooldown(Duration::from_secs(3600))
        .build()
        .unwrap();
    eject_then_restart(&client, &mut a).await;
    // a re-registers (a new record): discovery inserts it again.
    let mut again = records[0].clone();
    again.last_updated = Timestamp::from_millis(2);
    conn.send(&event("2-0", "updated", &again)).await;
    gets_traffic_again(&client, &a).await;
}

#[cfg(feature = "tonic")]
#[tokio::test]
async fn the_tonic_adapter_balances_and_follows_removals() {
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    async fn health(status: tonic_health::ServingStatus) -> (String, Task) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter.set_service_status("who", status).await;
        let task = tokio::spawn(async move {
            let _ = ::tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(::tonic::transport::server::TcpIncoming::from(listener))
                .await;
        });
        (url, Task(task))
    }
    let (serving, _s1) = health(tonic_health::ServingStatus::Serving).await;
    let (not_serving, _s2) = health(tonic_health::ServingStatus::NotServing).await;
    let (w, _feed, mut conn, records) = watching(&[&serving, &not_serving]).await;
    let mut client = HealthClient::new(tonic::balance_channel(&w));
    let mut seen = HashSet::new();
    within("both servers answer", async {
        while seen.len() < 2 {
            let res = client
                .check(HealthCheckRequest {
                    service: "who".into(),
                })
                .await
                .unwrap();
            seen.insert(res.into_inner().status);
        }
    })
    .await;
    // The serving one leaves: only the other answers from then on.
    conn.send(&event("2-0", "deregistered", &records[0])).await;
    let mut in_a_row = 0;
    within("only the remaining server answers", async {
        while in_a_row < 20 {
            let res = client
                .check(HealthCheckRequest {
                    service: "who".into(),
                })
                .await
                .unwrap();
            if res.into_inner().status == Status::NotServing as i32 {
                in_a_row += 1;
            } else {
                in_a_row = 0;
            }
        }
    })
    .await;
}

/// A resync snapshot whose records only moved by their pings changes nothing (no `Insert`
/// for subscribers, so a balancer keeps its endpoints); a re-registration does.
#[test]
fn resyncs_announce_re_registrations_not_pings() {
    use super::cache::{Cache, Diff};
    use std::collections::HashMap;
    let cache = Cache::new(16);
    let id = Ulid::new();
    let first = record(id, "http://a:1");
    cache.replace(HashMap::from([(id, Instance::from(first.clone()))]));
    let (_, mut rx) = cache.subscribe();

    let mut pinged = first.clone();
    pinged.last_ping_at = Timestamp::from_millis(20_000);
    pinged.expires_at = Timestamp::from_millis(50_000);
    let diff = cache.replace(HashMap::from([(id, Instance::from(pinged.clone()))]));
    assert_eq!(diff, Diff::default(), "pings alone are no change");
    assert!(rx.try_recv().is_err(), "nothing broadcast");
    assert_eq!(
        cache.instances()[0].record.expires_at,
        pinged.expires_at,
        "the newer record is kept"
    );

    let mut again = pinged;
    again.last_updated = Timestamp::from_millis(21_000);
    let diff = cache.replace(HashMap::from([(id, Instance::from(again))]));
    assert_eq!(diff.changed, 1, "a re-registration is news");
    assert!(rx.try_recv().is_ok());
}

#[tokio::test]
async fn an_instance_that_never_answers_is_a_timeout_naming_it() {
    // Takes requests and holds the connections open without a word.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let _silent = Task(tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    }));
    let (w, _feed, _conn, _) = watching(&[&url]).await;
    let client = BalancedClient::builder(w)
        .request_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let err = within("the request timeout", client.get("/slow?x=1"))
        .await
        .unwrap_err();
    match &err {
        Error::Timeout {
            method,
            path,
            instance,
            after,
        } => {
            assert_eq!(
                (method, path.as_str(), instance.as_str(), *after),
                (
                    &http::Method::GET,
                    "/slow?x=1",
                    url.as_str(),
                    Duration::from_millis(200)
                )
            );
        }
        other => panic!("not a timeout: {other:?}"),
    }
}

/// A request whose connection could not be made never left: it is retried on another
/// instance whatever its method.
#[tokio::test]
async fn a_request_that_never_left_is_retried_whatever_its_method() {
    let mut dead = Vec::new();
    for _ in 0..6 {
        let mut b = Backend::start("dead").await;
        b.kill();
        dead.push(b);
    }
    let live = Backend::start("live").await;
    let mut urls: Vec<String> = dead.iter().map(Backend::url).collect();
    urls.push(live.url());
    let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    let (w, _feed, _conn, _) = watching(&refs).await;
    let client = BalancedClient::builder(w).max_attempts(8).build().unwrap();
    for i in 0..6 {
        let req = Request::post("/orders")
            .body(Full::new(Bytes::from(format!("order {i}"))))
            .unwrap();
        let res = client
            .send(req)
            .await
            .unwrap_or_else(|e| panic!("POST {i}: {e}"));
        assert_eq!(res.status(), 200);
    }
    assert_eq!(live.hits(), 6, "each POST reached the live instance once");
}

/// Every instance failing at once is more likely the caller's trouble: the last one is not
/// ejected, so it serves again as soon as it is back (not after the cooldown).
#[tokio::test]
async fn the_last_instance_standing_is_never_ejected() {
    let mut only = Backend::start("only").await;
    let (w, _feed, _conn, _) = watching(&[&only.url()]).await;
    let client = BalancedClient::builder(w)
        .ready_timeout(Duration::from_millis(300))
        .eject_cooldown(Duration::from_secs(600))
        .build()
        .unwrap();
    only.kill();
    let err = client.get("/").await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    only.restart().await;
    let res = client.get("/").await.expect("served again at once");
    assert_eq!(body_text(&res), "only GET /");
}

// --- Health ---

fn with_health(record: &ServiceRecord, status: HealthStatus) -> ServiceRecord {
    ServiceRecord {
        health: Health {
            status,
            output: format!("{status} now"),
            checked_at: Some(Timestamp::from_millis(5)),
        },
        ..record.clone()
    }
}

#[tokio::test]
async fn critical_instances_leave_the_cache_and_come_back_when_passing() {
    let mut feed = Feed::start().await;
    let w = watcher(&feed).build().unwrap();
    assert_eq!(w.health(), DEFAULT_HEALTH);
    let [a, b, c, d, _] = ids();
    let ra = record(a, "http://a:1");
    let rb = with_health(&record(b, "http://b:1"), HealthStatus::Critical);
    let rc = with_health(&record(c, "http://c:1"), HealthStatus::Warning);
    let mut conn = feed.accept().await;
    conn.ok().await;
    // Filtered by the watcher: the feed sends the critical b too.
    conn.send(&snapshot("1-0", &[&ra, &rb, &rc])).await;
    within("the first snapshot", w.synced()).await;
    assert_eq!(urls(&w), ["http://a:1", "http://c:1"]);
    let mut changes = w.discover();
    assert_eq!(next_change(&mut changes).await, "+http://a:1");
    assert_eq!(next_change(&mut changes).await, "+http://c:1");

    // a turns critical: removed; b turns passing: added; c warning -> passing is news too.
    conn.send(&event(
        "2-0",
        "updated",
        &with_health(&ra, HealthStatus::Critical),
    ))
    .await;
    assert_eq!(next_change(&mut changes).await, format!("-{a}"));
    conn.send(&event(
        "3-0",
        "updated",
        &with_health(&rb, HealthStatus::Passing),
    ))
    .await;
    assert_eq!(next_change(&mut changes).await, "+http://b:1");
    conn.send(&event(
        "4-0",
        "updated",
        &with_health(&rc, HealthStatus::Passing),
    ))
    .await;
    assert_eq!(next_change(&mut changes).await, "+http://c:1");
    // A new instance registering critical is not added; a record without health (an
    // orchestrator before health) reads as passing.
    let rd = with_health(&record(d, "http://d:1"), HealthStatus::Critical);
    conn.send(&event("5-0", "registered", &rd)).await;
    let mut bare = serde_json::to_value(&ra).unwrap();
    bare.as_object_mut().unwrap().remove("health");
    conn.send(&format!("id: 6-0\nevent: updated\ndata: {bare}\n\n"))
        .await;
    assert_eq!(next_change(&mut changes).await, "+http://a:1");
    assert_eq!(urls(&w), ["http://a:1", "http://b:1", "http://c:1"]);
}

#[tokio::test]
async fn all_three_statuses_mean_no_health_filtering() {
    let mut feed = Feed::start().await;
    let w = watcher(&feed).health(HealthStatus::ALL).build().unwrap();
    let [a, ..] = ids();
    let mut conn = feed.accept().await;
    assert!(
        conn.head
            .starts_with("get /services?watch=true&display_name=svca http/1.1"),
        "{}",
        conn.head
    );
    conn.ok().await;
    let critical = with_health(&record(a, "http://a:1"), HealthStatus::Critical);
    conn.send(&snapshot("1-0", &[&critical])).await;
    within("the first snapshot", w.synced()).await;
    assert_eq!(urls(&w), ["http://a:1"]);

    let w = watcher(&feed)
        .health([HealthStatus::Critical])
        .build()
        .unwrap();
    let conn = feed.accept().await;
    // The filter is the watcher's own: the orchestrator is not asked for it.
    assert!(!conn.head.contains("health="), "{}", conn.head);
    drop(w);

    let err = watcher(&feed).health([]).build().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Config(ConfigError::InvalidOption { name: "health", .. })
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_balancer_stops_calling_a_critical_instance_and_calls_it_again_when_passing() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (w, _feed, mut conn, records) = watching(&[&a.url(), &b.url()]).await;
    let client = BalancedClient::new(w.clone());
    gets_traffic_again(&client, &a).await;

    conn.send(&event(
        "2-0",
        "updated",
        &with_health(&records[0], HealthStatus::Critical),
    ))
    .await;
    wait_until("a leaves the cache", || urls(&w) == [b.url()]).await;
    let before = a.hits();
    for _ in 0..40 {
        let res = client.get("/").await.unwrap();
        assert_eq!(res.extensions().get::<ServedBy>().unwrap().url, b.url());
    }
    assert_eq!(a.hits(), before, "a critical instance got requests");

    conn.send(&event(
        "3-0",
        "updated",
        &with_health(&records[0], HealthStatus::Passing),
    ))
    .await;
    within("a gets traffic again", async {
        while a.hits() == before {
            client.get("/").await.unwrap();
        }
    })
    .await;
}
