//! The watch feed (`GET /services?watch=true`) over real sockets: the wire contract of
//! COMMON.md / the README, end to end through the HTTP stack.
//!
//! Every test is a function of a [`Factory`] (how to start an orchestrator from a config),
//! instantiated per store by [`watch_tests!`]: the memory store here; a Valkey instantiation
//! only needs a factory that starts a Valkey and sets `valkey_url`.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use http::Method;
use serde_json::{json, Value};
use servicekit::protocol::problem_type as t;
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server::{self, Running};
use servicekit_orchestrator::store::Cursor;
use support::http::Api;
use support::sse::{Event, Item, Open, SseStream};

/// Generous bound for anything that should come at once; a deadline, not a speed claim.
const SOON: Duration = Duration::from_secs(10);

/// A started orchestrator and what keeps its backing store alive.
pub struct Server {
    pub running: Running,
    pub api: Api,
    /// E.g. a Valkey process, dropped (stopped) with the server.
    pub _backing: Box<dyn std::any::Any + Send>,
}

impl Server {
    fn addr(&self) -> SocketAddr {
        self.running.local_addr()
    }
}

/// Starts an orchestrator from a config (the factory picks the store).
pub type Factory = fn(Config) -> Pin<Box<dyn Future<Output = Server> + Send>>;

fn memory_server(config: Config) -> Pin<Box<dyn Future<Output = Server> + Send>> {
    Box::pin(async move {
        let running = server::start(config).await.expect("orchestrator starts");
        let api = Api::new(running.base_url());
        Server {
            running,
            api,
            _backing: Box::new(()),
        }
    })
}

/// Instantiates every watch test for one factory, as `mod $name`.
macro_rules! watch_tests {
    ($name:ident, $factory:expr) => {
        mod $name {
            use super::*;
            watch_tests!(@each $factory;
                snapshot_is_the_list_answer_for_the_filter,
                changes_arrive_in_order_with_increasing_ids,
                expiry_reaches_watchers_without_any_read,
                filters_follow_records_in_and_out,
                health_changes_are_updates_and_move_records_across_health_filters,
                last_event_id_resumes_with_only_the_missed_events,
                an_unusable_last_event_id_gets_a_snapshot,
                a_quiet_feed_sends_heartbeats,
                a_watcher_that_falls_behind_gets_a_fresh_snapshot,
                a_watcher_that_stops_reading_is_dropped,
                watchers_beyond_the_limit_get_a_429_problem,
                shutdown_ends_streams_cleanly,
                bad_watch_queries_are_400_problems,
            );
        }
    };
    (@each $factory:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test($factory).await;
            }
        )*
    };
}

/// An orchestrator on a Valkey of its own (stopped with the server), with its own prefix.
fn valkey_server(mut config: Config) -> Pin<Box<dyn Future<Output = Server> + Send>> {
    Box::pin(async move {
        let valkey = support::valkey::ValkeyServer::new();
        config.valkey_url = Some(valkey.url());
        config.key_prefix = format!("test:{}:", ulid::Ulid::new());
        let running = server::start(config).await.expect("orchestrator starts");
        let api = Api::new(running.base_url());
        Server {
            running,
            api,
            _backing: Box::new(valkey),
        }
    })
}

watch_tests!(memory, memory_server);
watch_tests!(valkey, valkey_server);

fn with_tuning(f: impl FnOnce(&mut servicekit_orchestrator::watch::WatchTuning)) -> Config {
    let mut config = Config::for_tests();
    f(&mut config.watch_tuning);
    config
}

async fn register(api: &Api, url: &str, info: Value) -> String {
    let r = api
        .post_json("/services/$register", &json!({"url": url, "info": info}))
        .await;
    assert!(r.status.is_success(), "register failed: {r:?}");
    r.json::<Value>()["id"].as_str().expect("id").to_owned()
}

/// Opens a watch on `query` and checks the head of the answer and the `retry:` hint.
async fn watch(server: &Server, query: &str, headers: &[(&str, &str)]) -> SseStream {
    let mut s = SseStream::open(server.addr(), &format!("/services?{query}"), headers).await;
    assert_stream_head(&s);
    assert_eq!(
        s.next(SOON).await.expect("retry hint"),
        Some(Item::Retry(2000))
    );
    s
}

fn assert_stream_head(s: &SseStream) {
    assert_eq!(s.status, 200, "{:?}", s.headers);
    assert_eq!(s.header("content-type"), Some("text/event-stream"));
    assert_eq!(s.header("cache-control"), Some("no-store"));
    assert_eq!(s.header("x-accel-buffering"), Some("no"));
}

/// The next event, which must be a snapshot; returns its data.
async fn snapshot(s: &mut SseStream) -> (Cursor, Value) {
    let e = s.next_event(SOON).await;
    assert_eq!(e.event, "snapshot", "{e:?}");
    (cursor(&e), e.json())
}

fn cursor(e: &Event) -> Cursor {
    e.id()
        .parse()
        .unwrap_or_else(|_| panic!("id is a cursor: {e:?}"))
}

fn ids(list: &Value) -> Vec<String> {
    let services = list["services"].as_array().expect("services");
    assert_eq!(list["count"], services.len(), "{list}");
    services
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_owned())
        .collect()
}

/// A sample of `/metrics` (labels as written, e.g. `servicekit_watchers` or
/// `servicekit_watch_snapshots_total{reason="lagged"}`); 0 when absent.
async fn metric(api: &Api, sample: &str) -> f64 {
    let text = String::from_utf8(api.get("/metrics").await.body.to_vec()).expect("utf-8");
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// Waits until `sample` satisfies `ok`.
async fn await_metric(api: &Api, sample: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = metric(api, sample).await;
        if ok(v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sample} stayed at {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn snapshot_is_the_list_answer_for_the_filter(start: Factory) {
    let server = start(Config::for_tests()).await;
    let api = &server.api;
    register(
        api,
        "http://a1:1",
        json!({"display_name": "svca", "zone": "eu"}),
    )
    .await;
    register(
        api,
        "http://a2:1",
        json!({"display_name": "svca", "zone": "us"}),
    )
    .await;
    register(
        api,
        "http://b1:1",
        json!({"display_name": "svcb", "zone": "eu"}),
    )
    .await;
    for query in [
        "display_name=svca",
        "display_name=svca&info.zone=eu",
        "info.zone=eu",
        "url=http://b1:1",
        "",
        "display_name=nobody",
    ] {
        let mut s = watch(&server, &format!("watch=true&{query}"), &[]).await;
        let (_, data) = snapshot(&mut s).await;
        let list: Value = api.get(&format!("/services?{query}")).await.json();
        assert_eq!(data, list, "{query}");
        assert!(
            !ids(&data).is_empty() || query.contains("nobody"),
            "{query}"
        );
    }
}

pub async fn changes_arrive_in_order_with_increasing_ids(start: Factory) {
    let server = start(Config::for_tests()).await;
    let api = &server.api;
    let mut s = watch(&server, "watch=true", &[]).await;
    let (head, data) = snapshot(&mut s).await;
    assert_eq!(ids(&data).len(), 0);
    let a = register(api, "http://a:1", json!({"display_name": "A"})).await;
    register(api, "http://a:1", json!({"display_name": "A", "v": 2})).await;
    let b = register(api, "http://b:1", json!({"display_name": "B"})).await;
    api.put(&format!("/services/{a}/$ping")).await;
    let r = api.delete(&format!("/services/{b}")).await;
    assert_eq!(r.status, 200);
    let mut last = head;
    let mut got = Vec::new();
    for _ in 0..4 {
        let e = s.next_event(SOON).await;
        let at = cursor(&e);
        assert!(at > last, "ids increase: {at} after {last}");
        last = at;
        let data = e.json();
        got.push((e.event.clone(), data["id"].as_str().expect("id").to_owned()));
        match e.event.as_str() {
            "registered" | "updated" => {
                let _: servicekit::protocol::ServiceRecord =
                    serde_json::from_value(data).expect("a record");
            }
            _ => assert!(data["url"].is_string(), "{data}"),
        }
    }
    let expected = [
        ("registered", &a),
        ("updated", &a),
        ("registered", &b),
        ("deregistered", &b),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(e, id)| (e.to_string(), id.to_string()))
        .collect();
    assert_eq!(got, expected, "a ping is no event");
}

pub async fn expiry_reaches_watchers_without_any_read(start: Factory) {
    let mut config = Config::for_tests();
    config.ttl_seconds = 1;
    let server = start(config).await;
    let api = &server.api;
    let mut s = watch(&server, "watch=true", &[]).await;
    snapshot(&mut s).await;
    let id = register(
        api,
        "http://a:1",
        json!({"display_name": "A", "zone": "eu"}),
    )
    .await;
    assert_eq!(s.next_event(SOON).await.event, "registered");
    // Nothing reads the entry: the reaper notices.
    let e = s.next_event(SOON).await;
    assert_eq!(e.event, "expired", "{e:?}");
    let data = e.json();
    assert_eq!(data["id"], id.as_str());
    assert_eq!(data["url"], "http://a:1");
    assert_eq!(data["info"]["zone"], "eu", "the last record: {data}");
    assert!(metric(api, "servicekit_registrations_expired_total").await >= 1.0);
}

pub async fn filters_follow_records_in_and_out(start: Factory) {
    let server = start(Config::for_tests()).await;
    let api = &server.api;
    let mut s = watch(&server, "watch=true&display_name=svca&info.zone=eu", &[]).await;
    snapshot(&mut s).await;
    let a = register(
        api,
        "http://a:1",
        json!({"display_name": "svca", "zone": "eu"}),
    )
    .await;
    register(
        api,
        "http://x:1",
        json!({"display_name": "svca", "zone": "us"}),
    )
    .await;
    register(
        api,
        "http://y:1",
        json!({"display_name": "svcb", "zone": "eu"}),
    )
    .await;
    // Renamed away, back, then out of the info filter, then removed while out: the removal
    // of an id the watcher no longer knows is not sent.
    register(
        api,
        "http://a:1",
        json!({"display_name": "svcb", "zone": "eu"}),
    )
    .await;
    register(
        api,
        "http://a:1",
        json!({"display_name": "svca", "zone": "eu"}),
    )
    .await;
    register(
        api,
        "http://a:1",
        json!({"display_name": "svca", "zone": "us"}),
    )
    .await;
    api.delete(&format!("/services/{a}")).await;
    let b = register(
        api,
        "http://b:1",
        json!({"display_name": "svca", "zone": "eu"}),
    )
    .await;
    let mut got = Vec::new();
    loop {
        let e = s.next_event(SOON).await;
        let data = e.json();
        let id = data["id"].as_str().expect("id").to_owned();
        got.push((
            e.event.clone(),
            id.clone(),
            data["info"]["display_name"].clone(),
        ));
        if id == b {
            break;
        }
    }
    let expected = vec![
        ("registered".to_owned(), a.clone(), json!("svca")),
        ("deregistered".to_owned(), a.clone(), json!("svcb")),
        ("registered".to_owned(), a.clone(), json!("svca")),
        ("deregistered".to_owned(), a.clone(), json!("svca")),
        ("registered".to_owned(), b.clone(), json!("svca")),
    ];
    assert_eq!(got, expected);
}

pub async fn health_changes_are_updates_and_move_records_across_health_filters(start: Factory) {
    let server = start(Config::for_tests()).await;
    let api = &server.api;
    let mut all = watch(&server, "watch=true", &[]).await;
    let mut healthy = watch(&server, "watch=true&health=passing,warning", &[]).await;
    for s in [&mut all, &mut healthy] {
        snapshot(s).await;
    }
    // (Registered after the snapshots: one registered before might also come as an `updated`
    // when the snapshot's listing saw it before the hub's cursor did.)
    let a = register(api, "http://a:1", json!({"display_name": "svca"})).await;
    for s in [&mut all, &mut healthy] {
        assert_eq!(s.next_event(SOON).await.event, "registered");
    }
    let report = |status: &str, output: &str| {
        let body = json!({"status": status, "output": output}).to_string();
        let path = format!("/services/{a}/$ping");
        async move {
            let r = api
                .send(
                    Method::PUT,
                    &path,
                    &[("content-type", "application/json")],
                    Some(body.into_bytes()),
                )
                .await;
            assert_eq!(r.status, 200, "{r:?}");
        }
    };
    // Output alone is no event; each change of status is one, with the new health.
    report("passing", "fine").await;
    report("warning", "slow").await;
    report("warning", "slower").await;
    report("critical", "down").await;
    report("passing", "back").await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = all.next_event(SOON).await;
        let h = &e.json()["health"];
        seen.push((e.event.clone(), h["status"].clone(), h["output"].clone()));
    }
    assert_eq!(
        seen,
        [
            ("updated".to_owned(), json!("warning"), json!("slow")),
            ("updated".to_owned(), json!("critical"), json!("down")),
            ("updated".to_owned(), json!("passing"), json!("back")),
        ]
    );
    // Through `?health=passing,warning`, critical is a removal and passing a return.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = healthy.next_event(SOON).await;
        let data = e.json();
        assert_eq!(data["id"], a.as_str(), "{data}");
        // A removal's data is the entry's id, URL and info, not its health.
        seen.push((e.event.clone(), data["health"]["status"].clone()));
    }
    assert_eq!(
        seen,
        [
            ("updated".to_owned(), json!("warning")),
            ("deregistered".to_owned(), Value::Null),
            ("registered".to_owned(), json!("passing")),
        ]
    );
}

pub async fn last_event_id_resumes_with_only_the_missed_events(start: Factory) {
    let server = start(Config::for_tests()).await;
    let api = &server.api;
    let query = "watch=true&display_name=svca";
    let mut s = watch(&server, query, &[]).await;
    snapshot(&mut s).await;
    let x = register(api, "http://x:1", json!({"display_name": "svca"})).await;
    let y = register(api, "http://y:1", json!({"display_name": "svca"})).await;
    assert_eq!(s.next_event(SOON).await.event, "registered");
    let seen = s.next_event(SOON).await;
    assert_eq!(seen.json()["id"], y.as_str());
    drop(s);
    // Missed while away: one new, one removed, one renamed away, one never ours (a new entry
    // that does not match: the client cannot know it, so it hears nothing of it).
    let z = register(api, "http://z:1", json!({"display_name": "svca"})).await;
    api.delete(&format!("/services/{x}")).await;
    register(api, "http://y:1", json!({"display_name": "svcb"})).await;
    let other = register(api, "http://other:1", json!({"display_name": "other"})).await;
    register(
        api,
        "http://other:1",
        json!({"display_name": "other", "v": 2}),
    )
    .await;
    api.delete(&format!("/services/{other}")).await;
    let mut s = watch(&server, query, &[("last-event-id", seen.id())]).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let e = s.next_event(SOON).await;
        assert!(cursor(&e) > cursor(&seen));
        got.push((
            e.event.clone(),
            e.json()["id"].as_str().expect("id").to_owned(),
        ));
    }
    assert_eq!(
        got,
        vec![
            ("registered".to_owned(), z.clone()),
            ("deregistered".to_owned(), x),
            ("deregistered".to_owned(), y),
        ],
        "no snapshot, only what was missed"
    );
    // Live events follow as usual.
    api.delete(&format!("/services/{z}")).await;
    let e = s.next_event(SOON).await;
    assert_eq!(
        (e.event.as_str(), e.json()["id"].clone()),
        ("deregistered", json!(z))
    );
    assert_eq!(
        metric(
            api,
            "servicekit_watch_snapshots_total{reason=\"resume_gap\"}"
        )
        .await,
        0.0
    );
}

pub async fn an_unusable_last_event_id_gets_a_snapshot(start: Factory) {
    let server = start(Config::for_tests()).await;
    let api = &server.api;
    register(api, "http://a:1", json!({"display_name": "svca"})).await;
    let list: Value = api.get("/services").await.json();
    let head = {
        let mut s = watch(&server, "watch=true", &[]).await;
        snapshot(&mut s).await.0
    };
    let beyond = format!("{}-{}", head.ms + 60_000, 0);
    for id in ["garbage", "", "12-x", beyond.as_str()] {
        let mut s = watch(&server, "watch=true", &[("last-event-id", id)]).await;
        let (_, data) = snapshot(&mut s).await;
        assert_eq!(data, list, "after Last-Event-ID {id:?}");
    }
    assert!(
        metric(
            api,
            "servicekit_watch_snapshots_total{reason=\"resume_gap\"}"
        )
        .await
            >= 3.0,
        "an empty id counts as none"
    );
}

pub async fn a_quiet_feed_sends_heartbeats(start: Factory) {
    let config = with_tuning(|t| t.heartbeat = Duration::from_millis(100));
    let server = start(config).await;
    let mut s = watch(&server, "watch=true", &[]).await;
    snapshot(&mut s).await;
    for _ in 0..3 {
        match s.next(SOON).await {
            Ok(Some(Item::Comment(text))) => assert_eq!(text, "heartbeat"),
            other => panic!("a heartbeat comment, got {other:?}"),
        }
    }
}

/// Registers `n` updates of one URL with an info of about `size` bytes, `parallel` at a time.
async fn churn(api: &Api, n: usize, size: usize) {
    let blob = "x".repeat(size);
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..4 {
        let api = api.clone();
        let blob = blob.clone();
        tasks.spawn(async move {
            for i in (worker..n).step_by(4) {
                let url = format!("http://churn-{}:1", i % 8);
                let info = json!({"display_name": "churn", "blob": blob, "i": i});
                register(&api, &url, info).await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("churn task");
    }
}

pub async fn a_watcher_that_falls_behind_gets_a_fresh_snapshot(start: Factory) {
    // A small hub channel; a send timeout longer than the test: the watcher is slow, not gone.
    let config = with_tuning(|t| {
        t.hub_capacity = 8;
        t.body_capacity = 2;
        t.send_timeout = Duration::from_secs(120);
    });
    let server = start(config).await;
    let api = &server.api;
    let open = Open {
        headers: &[],
        recv_buffer: Some(4096),
    };
    let mut s = SseStream::open_with(server.addr(), "/services?watch=true", open).await;
    assert_stream_head(&s);
    s.next(SOON).await.expect("retry");
    snapshot(&mut s).await;
    // Stop reading while far more changes pass than the socket buffers (~4 MB of 12 kB
    // events) and the hub's channel hold.
    let before = metric(api, "servicekit_watch_hub_changes_total").await;
    let n = 1200;
    churn(api, n, 12_000).await;
    await_metric(api, "servicekit_watch_hub_changes_total", |v| {
        v >= before + n as f64
    })
    .await;
    let marker = register(api, "http://after:1", json!({"display_name": "after"})).await;
    // Read again up to the marker's event: what was on its way, then a fresh snapshot
    // instead of the backlog, then live events; applied in order, they give the list.
    let mut state = std::collections::BTreeMap::<String, Value>::new();
    let (mut events, mut snapshots) = (0, 0);
    loop {
        let e = s.next_event(SOON).await;
        events += 1;
        let data = e.json();
        match e.event.as_str() {
            "snapshot" => {
                snapshots += 1;
                state = data["services"]
                    .as_array()
                    .expect("services")
                    .iter()
                    .map(|r| (r["id"].as_str().expect("id").to_owned(), r.clone()))
                    .collect();
            }
            "registered" | "updated" => {
                state.insert(data["id"].as_str().expect("id").to_owned(), data.clone());
            }
            _ => {
                state.remove(data["id"].as_str().expect("id"));
            }
        }
        if state.contains_key(&marker) {
            break;
        }
    }
    assert!(snapshots >= 1, "no fresh snapshot");
    assert!(
        events < n / 2,
        "the backlog was dropped, not sent: {events} events"
    );
    let lagged = "servicekit_watch_snapshots_total{reason=\"lagged\"}";
    assert!(metric(api, lagged).await >= 1.0);
    let list: Value = api.get("/services").await.json();
    let want: Vec<&Value> = list["services"]
        .as_array()
        .expect("services")
        .iter()
        .collect();
    assert_eq!(
        state.values().collect::<Vec<_>>(),
        want,
        "converged to the list"
    );
}
pub async fn a_watcher_that_stops_reading_is_dropped(start: Factory) {
    let config = with_tuning(|t| {
        t.hub_capacity = 8;
        t.body_capacity = 2;
        t.send_timeout = Duration::from_millis(300);
    });
    let server = start(config).await;
    let api = &server.api;
    let open = Open {
        headers: &[],
        recv_buffer: Some(4096),
    };
    let mut s = SseStream::open_with(server.addr(), "/services?watch=true", open).await;
    s.next(SOON).await.expect("retry");
    snapshot(&mut s).await;
    assert_eq!(metric(api, "servicekit_watchers").await, 1.0);
    // Changes until the session gives up on its client.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while metric(api, "servicekit_watchers_dropped_total").await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "never dropped");
        churn(api, 100, 12_000).await;
    }
    await_metric(api, "servicekit_watchers", |v| v == 0.0).await;
    // The server is fine, and a new watcher is served.
    let mut again = watch(&server, "watch=true", &[]).await;
    snapshot(&mut again).await;
    drop(s);
}

pub async fn watchers_beyond_the_limit_get_a_429_problem(start: Factory) {
    let mut config = Config::for_tests();
    config.max_watchers = 2;
    let server = start(config).await;
    let api = &server.api;
    let mut first = watch(&server, "watch=true", &[]).await;
    snapshot(&mut first).await;
    let mut second = watch(&server, "watch=true&display_name=x", &[]).await;
    snapshot(&mut second).await;
    let r = tokio::time::timeout(SOON, api.get("/services?watch=true"))
        .await
        .expect("a whole answer, not a stream");
    let p = r.assert_problem(429, t::LIMIT_EXCEEDED);
    assert!(p["detail"].as_str().expect("detail").contains('2'), "{p}");
    assert!(r.header("retry-after").is_some(), "{r:?}");
    // Lists are not watchers.
    assert_eq!(api.get("/services").await.status, 200);
    drop(first);
    await_metric(api, "servicekit_watchers", |v| v == 1.0).await;
    let mut third = watch(&server, "watch=true", &[]).await;
    snapshot(&mut third).await;
}

pub async fn shutdown_ends_streams_cleanly(start: Factory) {
    let server = start(Config::for_tests()).await;
    let mut streams = Vec::new();
    for query in ["watch=true", "watch=true&display_name=a"] {
        let mut s = watch(&server, query, &[]).await;
        snapshot(&mut s).await;
        streams.push(s);
    }
    let Server {
        running, _backing, ..
    } = server;
    let stopping = tokio::spawn(running.shutdown());
    for s in &mut streams {
        // The body's last chunk, not a reset: the drain deadline (10 s) is not what ends it.
        s.expect_end(Duration::from_secs(5)).await;
    }
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("shutdown does not wait for the drain deadline")
        .expect("joined");
}

pub async fn bad_watch_queries_are_400_problems(start: Factory) {
    let server = start(Config::for_tests()).await;
    let api = &server.api;
    for query in [
        "watch=yes",
        "watch=",
        "watch=TRUE",
        "watch=true&limit=5",
        "watch=true&cursor=01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "watch=true&bogus=1",
        "watch=true&url=ftp://x",
    ] {
        let r = tokio::time::timeout(SOON, api.get(&format!("/services?{query}")))
            .await
            .expect("a whole answer, not a stream");
        let p = r.assert_problem(400, t::BAD_REQUEST);
        assert_eq!(p["instance"], "/services", "{query}: {p}");
    }
    assert_eq!(metric(api, "servicekit_watchers").await, 0.0);
    // watch=false is the plain list.
    let r = api.get("/services?watch=false&limit=5").await;
    assert_eq!(r.status, 200, "{r:?}");
}

/// Two orchestrator replicas on one Valkey (one prefix): a registration and a deregistration
/// through A reach a watcher on B as events, an expiry reaches watchers on both, and a
/// watcher resuming on B with an id it got from A gets only what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_one_replica_reach_watchers_on_every_replica() {
    let valkey = support::valkey::ValkeyServer::new();
    let prefix = format!("test:{}:", ulid::Ulid::new());
    // memory_server starts whatever store the config names: here the shared Valkey.
    let replica = || {
        let mut config = Config::for_tests();
        config.ttl_seconds = 1;
        config.valkey_url = Some(valkey.url());
        config.key_prefix = prefix.clone();
        memory_server(config)
    };
    let (a, b) = (replica().await, replica().await);
    let mut on_a = watch(&a, "watch=true", &[]).await;
    let mut on_b = watch(&b, "watch=true", &[]).await;
    snapshot(&mut on_a).await;
    snapshot(&mut on_b).await;

    let kept = register(&a.api, "http://kept:1", json!({"display_name": "R"})).await;
    let e = on_b.next_event(SOON).await;
    assert_eq!(
        (e.event.as_str(), e.json()["id"].as_str()),
        ("registered", Some(kept.as_str()))
    );
    let from_a = on_a.next_event(SOON).await;
    assert_eq!(
        from_a.id(),
        e.id(),
        "one log, one id for the change on every replica"
    );

    // A watcher that got its last id from A resumes on B with only what it missed.
    let gone = register(&a.api, "http://gone:1", json!({"display_name": "R"})).await;
    let r = a.api.delete(&format!("/services/{gone}")).await;
    assert_eq!(r.status, 200, "{r:?}");
    let mut resumed = watch(&b, "watch=true", &[("last-event-id", from_a.id())]).await;
    let kinds: Vec<(String, String)> = [
        resumed.next_event(SOON).await,
        resumed.next_event(SOON).await,
    ]
    .iter()
    .map(|e| {
        (
            e.event.clone(),
            e.json()["id"].as_str().unwrap_or("").to_owned(),
        )
    })
    .collect();
    assert_eq!(
        kinds,
        [
            ("registered".to_owned(), gone.clone()),
            ("deregistered".to_owned(), gone.clone())
        ]
    );

    // Never pinged: both entries expire (TTL 1 s) and every watcher hears of `kept`'s expiry.
    for (name, s) in [("A", &mut on_a), ("B", &mut on_b)] {
        let mut seen = Vec::new();
        let expired = loop {
            let e = s.next_event(SOON).await;
            if e.event == "expired" && e.json()["id"] == kept.as_str() {
                break e;
            }
            seen.push(e.event.clone());
        };
        assert_eq!(expired.json()["url"], "http://kept:1", "on {name}");
        assert!(
            !seen.contains(&"snapshot".to_owned()),
            "an event on {name}, not a resync: {seen:?}"
        );
    }
}
