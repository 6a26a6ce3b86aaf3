//! Pull health checks end to end: in-process orchestrators check real little target servers
//! on 127.0.0.1 (HTTP, TCP, gRPC) and the records' health follows; with two replicas on one
//! real Valkey, each instance is checked by one replica, and another takes over when it stops.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use servicekit::protocol::problem_type as t;
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server::{self, Running};
use support::http::Api;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The check interval of these tests.
const INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait for anything the tests expect to happen.
const WAIT: Duration = Duration::from_secs(15);

/// One request a target saw.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    checker: Option<String>,
    user_agent: Option<String>,
    at: Instant,
}

/// A little HTTP server whose answers the test controls:
/// - `…/health`: the status set with [`Target::set`] (200 at first), body `healthy`/`unhealthy`
///   (paths starting with `/bad` always 503);
/// - `/redirect`: 302 to `/landing`; `/landing`: 200;
/// - `/endless`: 200 with a body that never ends;
/// - `…/hang`: accepts and never answers,
///   forever.
struct Target {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Answer = Response<BoxBody<Bytes, Infallible>>;

fn full(status: u16, body: &'static str) -> Answer {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(body.as_bytes())).boxed())
        .expect("response")
}

/// A body that never ends: `chunk` again and again.
struct Forever(Bytes);

impl Body for Forever {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(Some(Ok(Frame::data(self.0.clone()))))
    }
}

impl Target {
    async fn start() -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let status = Arc::new(AtomicU16::new(200));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (st, sn) = (status.clone(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (st, sn) = (st.clone(), sn.clone());
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (st, sn) = (st.clone(), sn.clone());
                    async move {
                        let header = |name: &str| {
                            req.headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned)
                        };
                        let path = req.uri().path().to_owned();
                        sn.lock().expect("lock").push(Seen {
                            path: path.clone(),
                            checker: header("x-servicekit-checker"),
                            user_agent: header("user-agent"),
                            at: Instant::now(),
                        });
                        let answer = match path.as_str() {
                            "/redirect" => Response::builder()
                                .status(302)
                                .header("location", "/landing")
                                .body(Full::new(Bytes::new()).boxed())
                                .expect("response"),
                            "/landing" => full(200, "landed"),
                            "/endless" => {
                                Response::new(Forever(Bytes::from(vec![b'x'; 8192])).boxed())
                            }
                            p if p.ends_with("/hang") => {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                full(200, "late")
                            }
                            p if p.starts_with("/bad") => full(503, "unhealthy"),
                            _ => match st.load(Ordering::SeqCst) {
                                200 => full(200, "healthy"),
                                s => full(s, "unhealthy"),
                            },
                        };
                        Ok::<_, Infallible>(answer)
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Target {
            addr,
            status,
            seen,
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    fn requests_to(&self, path: &str) -> usize {
        self.seen().iter().filter(|s| s.path == path).count()
    }
}

async fn orchestrator() -> (Running, Api) {
    let running = server::start(Config::for_tests())
        .await
        .expect("orchestrator starts");
    let api = Api::new(running.base_url());
    (running, api)
}

/// Registers `url` with `check` (interval and timeout default to 1 s here) and returns its id.
async fn register(api: &Api, url: &str, mut check: Value) -> String {
    for (k, v) in [("interval_seconds", 1), ("timeout_seconds", 1)] {
        if check.get(k).is_none() {
            check[k] = json!(v);
        }
    }
    let r = api
        .post_json(
            "/services/$register",
            &json!({"url": url, "info": {"display_name": "checked"}, "check": check}),
        )
        .await;
    assert!(r.status.is_success(), "register: {r:?}");
    let v: Value = r.json();
    v["id"].as_str().expect("id").to_owned()
}

/// The record's health, `None` once it is gone.
async fn health(api: &Api, id: &str) -> Option<Value> {
    let r = api.get(&format!("/services/{id}")).await;
    if r.status == StatusCode::NOT_FOUND {
        return None;
    }
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    Some(r.json::<Value>()["health"].clone())
}

/// Waits until `cond` holds for the record's health; returns that health and how long it took.
async fn health_until(
    api: &Api,
    id: &str,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let started = Instant::now();
    loop {
        let h = health(api, id).await.unwrap_or(Value::Null);
        if cond(&h) {
            return (h, started.elapsed());
        }
        assert!(started.elapsed() < WAIT, "{what}: health still {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn status_is(status: &'static str) -> impl Fn(&Value) -> bool {
    move |h| h["status"] == status
}

fn output_of(h: &Value) -> &str {
    h["output"].as_str().unwrap_or_default()
}

/// The ids `GET /services?health=…` lists.
async fn listed(api: &Api, health: &str) -> BTreeSet<String> {
    let v: Value = api.get(&format!("/services?health={health}")).await.json();
    v["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_owned())
        .collect()
}

#[tokio::test]
async fn an_unhealthy_target_turns_critical_within_two_intervals_and_comes_back() {
    let (orch, api) = orchestrator().await;
    let target = Target::start().await;
    let id = register(&api, &target.url(""), json!({"http": "/health"})).await;
    let (h, _) = health_until(&api, &id, "first check", |h| !output_of(h).is_empty()).await;
    assert_eq!(h["status"], "passing", "{h}");
    assert_eq!(output_of(&h), "HTTP 200 OK");
    assert!(h["checked_at"].is_string(), "{h}");
    // The target can tell who checks.
    let first = target.seen().into_iter().next().expect("a check arrived");
    assert_eq!(first.path, "/health");
    assert_eq!(first.checker.as_deref(), Some(orch.checker_id()));
    let ua = first.user_agent.unwrap_or_default();
    assert!(ua.starts_with("servicekit-orchestrator/"), "{ua}");
    assert!(listed(&api, "passing").await.contains(&id));

    target.set(503);
    let (h, took) = health_until(&api, &id, "critical", status_is("critical")).await;
    println!("passing -> critical after {took:?} (interval {INTERVAL:?}, 2 failures needed)");
    // Two failing results in a row, one interval apart: within two intervals (plus the time
    // to answer and write).
    assert!(
        took <= INTERVAL * 2 + Duration::from_millis(500),
        "{took:?}"
    );
    assert_eq!(output_of(&h), "HTTP 503 Service Unavailable");
    assert!(!listed(&api, "passing").await.contains(&id));
    assert!(listed(&api, "critical").await.contains(&id));

    target.set(200);
    let (h, took) = health_until(&api, &id, "passing again", status_is("passing")).await;
    println!("critical -> passing after {took:?}");
    assert!(
        took <= INTERVAL * 2 + Duration::from_millis(500),
        "{took:?}"
    );
    assert_eq!(output_of(&h), "HTTP 200 OK");
    assert!(listed(&api, "passing").await.contains(&id));

    let metrics = String::from_utf8_lossy(&api.get("/metrics").await.body).into_owned();
    for family in [
        "servicekit_checks_total{result=\"critical\"}",
        "servicekit_checks_total{result=\"passing\"}",
        "servicekit_check_duration_seconds_count",
    ] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(family))
            .unwrap_or_else(|| panic!("no {family} in\n{metrics}"));
        assert!(!line.ends_with(" 0"), "{line}");
    }
    assert!(
        metrics.lines().any(|l| l == "servicekit_checks_owned 1"),
        "{metrics}"
    );
    orch.shutdown().await;
}

#[tokio::test]
async fn a_429_is_a_warning() {
    let (orch, api) = orchestrator().await;
    let target = Target::start().await;
    target.set(429);
    let id = register(
        &api,
        &target.url(""),
        json!({"http": "/health", "failures_before_critical": 1}),
    )
    .await;
    let (h, _) = health_until(&api, &id, "warning", status_is("warning")).await;
    assert_eq!(output_of(&h), "HTTP 429 Too Many Requests");
    assert!(listed(&api, "passing,warning").await.contains(&id));
    orch.shutdown().await;
}

#[tokio::test]
async fn a_target_that_never_answers_costs_the_timeout_and_is_critical() {
    let (orch, api) = orchestrator().await;
    let target = Target::start().await;
    let spec =
        |path: &str| json!({"http": path, "failures_before_critical": 1, "interval_seconds": 2});
    let hang = register(&api, &target.url("/a"), spec("/hang")).await;
    // A slow loris: a status line, then one byte of a header every 100 ms, never ending.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let drip_url = format!("http://{}", listener.local_addr().expect("addr"));
    let dripped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let drips = dripped.clone();
    let dripper = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let drips = drips.clone();
            tokio::spawn(async move {
                if stream
                    .write_all(b"HTTP/1.1 200 OK\r\nx-slow: ")
                    .await
                    .is_err()
                {
                    return;
                }
                while stream.write_all(b"a").await.is_ok() {
                    drips.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
    });
    let drip = register(&api, &drip_url, spec("/drip")).await;
    for id in [&hang, &drip] {
        let (h, _) = health_until(&api, id, "critical", status_is("critical")).await;
        assert_eq!(output_of(&h), "timed out after 1 s", "{h}");
    }
    assert!(target.requests_to("/a/hang") >= 1 && dripped.load(Ordering::Relaxed) >= 1);
    dripper.abort();
    orch.shutdown().await;
}

#[tokio::test]
async fn a_redirect_is_critical_and_not_followed() {
    let (orch, api) = orchestrator().await;
    let target = Target::start().await;
    let id = register(
        &api,
        &target.url(""),
        json!({"http": "/redirect", "failures_before_critical": 1}),
    )
    .await;
    let (h, _) = health_until(&api, &id, "critical", status_is("critical")).await;
    assert_eq!(output_of(&h), "HTTP 302 Found");
    // Another round, so a follow would have happened by now.
    tokio::time::sleep(INTERVAL).await;
    assert!(target.requests_to("/redirect") >= 1);
    assert_eq!(target.requests_to("/landing"), 0, "{:?}", target.seen());
    orch.shutdown().await;
}

#[tokio::test]
async fn an_endless_body_is_never_read_and_the_check_finishes() {
    let (orch, api) = orchestrator().await;
    let target = Target::start().await;
    let id = register(&api, &target.url(""), json!({"http": "/endless"})).await;
    let (h, took) = health_until(&api, &id, "checked", |h| !output_of(h).is_empty()).await;
    println!("endless body checked after {took:?}");
    // Passing: the check took the head and dropped the connection, well before its timeout;
    // nothing of the body reaches the (public) output.
    assert_eq!(h["status"], "passing", "{h}");
    assert_eq!(output_of(&h), "HTTP 200 OK");
    orch.shutdown().await;
}

#[tokio::test]
async fn a_tcp_check_follows_the_listener() {
    let (orch, api) = orchestrator().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepting = tokio::spawn(async move {
        loop {
            // Accept and close at once: connecting is all a TCP check does.
            drop(listener.accept().await);
        }
    });
    let id = register(
        &api,
        &format!("http://127.0.0.1:{port}"),
        json!({"tcp": true, "failures_before_critical": 1}),
    )
    .await;
    let (h, _) = health_until(&api, &id, "checked", |h| !output_of(h).is_empty()).await;
    assert_eq!(
        (h["status"].as_str(), output_of(&h)),
        (Some("passing"), "TCP connect ok")
    );
    accepting.abort();
    let _ = accepting.await;
    let (h, _) = health_until(&api, &id, "critical", status_is("critical")).await;
    assert_eq!(output_of(&h), "connection refused");
    orch.shutdown().await;
}

#[tokio::test]
async fn critical_instances_are_deregistered_after_the_set_time_passing_ones_never() {
    let (orch, api) = orchestrator().await;
    let target = Target::start().await;
    let spec = json!({"http": "/health", "failures_before_critical": 1,
        "deregister_critical_after_seconds": 1});
    let bad = register(&api, &target.url("/bad"), spec.clone()).await;
    let good = register(&api, &target.url("/good"), spec).await;
    let (_, critical_after) = health_until(&api, &bad, "critical", status_is("critical")).await;
    let started = Instant::now();
    while health(&api, &bad).await.is_some() {
        assert!(
            started.elapsed() < WAIT,
            "the critical instance stays registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "critical after {critical_after:?}, deregistered {:?} later (deregister_critical_after_seconds 1)",
        started.elapsed()
    );
    // Two more intervals: the passing one is checked and stays.
    tokio::time::sleep(INTERVAL * 2).await;
    let h = health(&api, &good)
        .await
        .expect("the passing instance stays");
    assert_eq!(h["status"], "passing");
    assert!(target.requests_to("/good/health") >= 2);
    orch.shutdown().await;
}

#[tokio::test]
async fn a_critical_instance_that_passes_again_is_not_deregistered_while_damped() {
    let (orch, api) = orchestrator().await;
    let target = Target::start().await;
    target.set(503);
    // Critical after one failure; back to passing only after ten passes (ten intervals), so
    // the damped status stays critical well past deregister_critical_after_seconds.
    let spec = json!({"http": "/health", "failures_before_critical": 1,
        "successes_before_passing": 10, "deregister_critical_after_seconds": 2});
    let id = register(&api, &target.url(""), spec).await;
    health_until(&api, &id, "critical", status_is("critical")).await;
    target.set(200);
    let healthy_from = target.requests_to("/health");
    // Past the deregistration time with passing probes (one interval of slack for a failing
    // probe that was already under way).
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) + INTERVAL * 2 {
        let h = health(&api, &id)
            .await
            .expect("an instance that passes again is not deregistered");
        assert_eq!(h["status"], "critical", "{h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        target.requests_to("/health") >= healthy_from + 3,
        "{:?}",
        target.seen()
    );
    orch.shutdown().await;
}

#[tokio::test]
async fn a_check_cannot_target_another_host() {
    let (orch, api) = orchestrator().await;
    let r = api
        .post_json(
            "/services/$register",
            &json!({"url": "http://127.0.0.1:1", "info": {"display_name": "x"},
                "check": {"http": "http://169.254.169.254/latest/meta-data"}}),
        )
        .await;
    let p = r.assert_problem(400, t::BAD_REQUEST);
    assert!(
        p["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("own host"),
        "{p}"
    );
    orch.shutdown().await;
}

/// Which checker ids `target` saw per path since `since`.
fn checkers_by_path(target: &Target, since: Instant) -> HashMap<String, BTreeSet<String>> {
    let mut by: HashMap<String, BTreeSet<String>> = HashMap::new();
    for s in target.seen().into_iter().filter(|s| s.at >= since) {
        by.entry(s.path)
            .or_default()
            .insert(s.checker.unwrap_or_default());
    }
    by
}

/// A gauge's value in `GET /metrics`.
async fn gauge(api: &Api, name: &str) -> Option<i64> {
    let text = String::from_utf8_lossy(&api.get("/metrics").await.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn two_replicas_on_one_valkey_share_the_checks_and_take_over_from_a_dead_one() {
    const N: usize = 8;
    let interval = Duration::from_secs(2);
    let valkey = support::valkey::ValkeyServer::new();
    let prefix = format!("test:{}:", ulid::Ulid::new());
    let mut config = Config::for_tests();
    config.checker_ttl_seconds = 1;
    let (a, api_a) = support::replicas::start_with(config.clone(), valkey.url(), &prefix).await;
    let (b, api_b) = support::replicas::start_with(config, valkey.url(), &prefix).await;
    let target = Target::start().await;
    for k in 0..N {
        register(
            &api_a,
            &target.url(&format!("/i{k}")),
            json!({"http": "/health", "interval_seconds": 2}),
        )
        .await;
    }
    // Both replicas see both, and between them own every instance.
    let started = Instant::now();
    loop {
        let (ca, cb) = (
            gauge(&api_a, "servicekit_checkers").await,
            gauge(&api_b, "servicekit_checkers").await,
        );
        let (oa, ob) = (
            gauge(&api_a, "servicekit_checks_owned").await.unwrap_or(0),
            gauge(&api_b, "servicekit_checks_owned").await.unwrap_or(0),
        );
        if ca == Some(2) && cb == Some(2) && oa + ob == N as i64 {
            println!("owned: {oa} by one replica, {ob} by the other");
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "checkers {ca:?}/{cb:?}, owned {oa}+{ob}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past any handover in progress (one announce period), then three intervals.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let window = Instant::now();
    tokio::time::sleep(interval * 3).await;
    let by_path = checkers_by_path(&target, window);
    let ids = [a.checker_id().to_owned(), b.checker_id().to_owned()];
    for k in 0..N {
        let path = format!("/i{k}/health");
        let checkers = by_path.get(&path).cloned().unwrap_or_default();
        assert_eq!(checkers.len(), 1, "{path} checked by {checkers:?}");
        assert!(ids.iter().any(|id| checkers.contains(id)), "{checkers:?}");
    }
    // Stop the owner of /i0; the other replica takes its instances over within an interval.
    let owner = by_path["/i0/health"].iter().next().cloned().expect("owner");
    let moved: Vec<String> = (0..N)
        .map(|k| format!("/i{k}/health"))
        .filter(|p| by_path[p].contains(&owner))
        .collect();
    let (dead, survivor) = if owner == ids[0] { (a, b) } else { (b, a) };
    let killed = Instant::now();
    dead.shutdown().await;
    let other = survivor.checker_id().to_owned();
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    for path in &moved {
        let first = loop {
            let taken = target.seen().into_iter().find(|s| {
                s.path == *path && s.at >= killed && s.checker.as_deref() == Some(&other)
            });
            if let Some(s) = taken {
                break s.at;
            }
            assert!(started.elapsed() < WAIT, "{path} not taken over");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        worst = worst.max(first - killed);
    }
    println!(
        "takeover of {} instance(s): the last one first checked by the survivor {worst:?} after \
         the owner stopped (interval {interval:?}, --checker-ttl-seconds 1)",
        moved.len()
    );
    assert!(worst <= interval, "takeover took {worst:?}");
    survivor.shutdown().await;
}
