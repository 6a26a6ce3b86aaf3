//! What operators see: `GET /metrics`, `GET /health` when Valkey refuses writes, and log lines
//! that client text cannot forge.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fred::interfaces::ClientLike;
use fred::types::InfoKind;
use serde_json::{json, Value};
use servicekit::protocol::problem_type as t;
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server::{self, Running};
use servicekit_orchestrator::store::ValkeyStore;
use support::http::Api;
use support::valkey::ValkeyServer;

/// The families `GET /metrics` must always expose (`registrations` whenever the store answers).
/// The HTTP families appear with the first answered request.
const FAMILIES: [&str; 9] = [
    "servicekit_http_requests_total",
    "servicekit_http_request_duration_seconds",
    "servicekit_store_operation_duration_seconds",
    "servicekit_registrations",
    "servicekit_registrations_expired_total",
    "servicekit_lease_rejections_total",
    "servicekit_valkey_reconnects_total",
    "servicekit_connections",
    "servicekit_store_operation_errors_total",
];

async fn start(config: Config) -> (Running, Api) {
    let running = server::start(config).await.expect("orchestrator starts");
    let api = Api::new(running.base_url());
    (running, api)
}

/// One scrape: the samples by `name{labels}`, and the whole text.
struct Scrape {
    samples: HashMap<String, f64>,
    text: String,
}

impl Scrape {
    async fn of(api: &Api) -> Scrape {
        let r = api.get("/metrics").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        let text = String::from_utf8(r.body.to_vec()).expect("UTF-8 metrics");
        let mut samples = HashMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (key, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
            samples.insert(key.to_owned(), value);
        }
        Scrape { samples, text }
    }

    /// The value of `key` (`name{labels}`), 0 when absent (a counter not yet touched).
    fn get(&self, key: &str) -> f64 {
        self.samples.get(key).copied().unwrap_or(0.0)
    }

    fn requests(&self, route: &str, status: u16) -> f64 {
        self.get(&format!(
            "servicekit_http_requests_total{{route=\"{route}\",status=\"{status}\"}}"
        ))
    }

    fn assert_families(&self) {
        for family in FAMILIES {
            assert!(
                self.text.contains(&format!("# TYPE {family} ")),
                "no {family} in\n{}",
                self.text
            );
        }
    }
}

/// Polls `check` until it holds, failing with `what` after `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_route_pattern_per_orchestrator() {
    // Connections that send nothing stay open for the whole test (the connection gauge is
    // checked while three idle sockets are open), and so does the scraper's kept-alive one.
    let mut config = Config::for_tests();
    config.header_timeout_seconds = 120;
    let (a_run, a) = start(config).await;
    // A second orchestrator in the same process, with a registration key: its counts are its
    // own, and its metrics need no key.
    let mut config = Config::for_tests();
    config.registration_key = Some("metrics-test-key".into());
    let (b_run, b) = start(config).await;

    let one = a.register("http://svca:8000", "A").await;
    a.register("http://svcb:8000", "B").await;
    let id = one["id"].as_str().expect("id").to_owned();
    for _ in 0..3 {
        assert_eq!(a.put(&format!("/services/{id}/$ping")).await.status, 200);
    }
    let unknown = ulid::Ulid::new();
    assert_eq!(
        a.put(&format!("/services/{unknown}/$ping")).await.status,
        404
    );
    assert_eq!(a.get(&format!("/services/{id}")).await.status, 200);
    assert_eq!(a.get("/services/not-an-id").await.status, 404);
    assert_eq!(a.get("/no/such/path-secret-1").await.status, 404);
    assert_eq!(a.get("/services").await.status, 200);
    let bad = a
        .post_json(
            "/services/$register",
            &json!({"url": "http://svcc:8000", "info": {"display_name": "x\ny"}}),
        )
        .await;
    bad.assert_problem(400, t::BAD_REQUEST);
    // The middleware's own answer (413 on a declared length) is counted too.
    let big = a
        .send(
            http::Method::POST,
            "/services/$register",
            &[("content-type", "application/json")],
            Some(vec![b' '; 65_537]),
        )
        .await;
    assert_eq!(big.status, 413);
    assert_eq!(b.get("/health").await.status, 200);
    assert_eq!(
        b.post_json(
            "/services/$register",
            &json!({"url": "http://svcd:8000", "info": {"display_name": "D"}})
        )
        .await
        .status,
        401
    );

    let m = Scrape::of(&a).await;
    m.assert_families();
    assert_eq!(m.requests("/services/$register", 201), 2.0);
    assert_eq!(m.requests("/services/$register", 400), 1.0);
    assert_eq!(m.requests("/services/$register", 413), 1.0);
    assert_eq!(m.requests("/services/{id}/$ping", 200), 3.0);
    assert_eq!(m.requests("/services/{id}/$ping", 404), 1.0);
    assert_eq!(m.requests("/services/{id}", 200), 1.0);
    assert_eq!(m.requests("/services/{id}", 404), 1.0);
    assert_eq!(m.requests("/services", 200), 1.0);
    assert_eq!(m.requests("unmatched", 404), 1.0);
    assert_eq!(m.requests("/health", 200), 0.0, "b's request, not a's");
    assert_eq!(
        m.get("servicekit_http_request_duration_seconds_count{route=\"/services/{id}/$ping\"}"),
        4.0
    );
    assert_eq!(
        m.get(
            "servicekit_http_request_duration_seconds_bucket{route=\"/services/{id}/$ping\",le=\"+Inf\"}"
        ),
        4.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.get("servicekit_store_operation_duration_seconds_count{op=\"ping\"}"),
        4.0
    );
    assert_eq!(
        m.get("servicekit_store_operation_duration_seconds_count{op=\"register\"}"),
        2.0
    );
    assert_eq!(m.get("servicekit_registrations"), 2.0);
    assert!(m.get("servicekit_connections") >= 1.0, "{}", m.text);
    // Route labels are patterns: no id, no raw path, ever.
    for raw in [
        id.as_str(),
        &unknown.to_string(),
        "not-an-id",
        "path-secret-1",
    ] {
        assert!(!m.text.contains(raw), "{raw} in\n{}", m.text);
    }

    let m = Scrape::of(&b).await;
    m.assert_families();
    assert_eq!(m.requests("/health", 200), 1.0);
    assert_eq!(m.requests("/services/$register", 401), 1.0);
    assert_eq!(m.requests("/services/$register", 201), 0.0);
    assert_eq!(m.get("servicekit_registrations"), 0.0);
    assert!(!m.text.contains("metrics-test-key"));
    // The previous scrape is counted like any request.
    assert_eq!(m.requests("/metrics", 200), 0.0);
    assert_eq!(Scrape::of(&b).await.requests("/metrics", 200), 1.0);

    // Open connections: three idle sockets are counted while open, and no longer once closed.
    // Scraped over a fresh connection each time (counted while it scrapes; one just closed may
    // still be counted for a moment), so the baseline is the lowest of a few scrapes and the
    // checks wait for the exact value.
    let scraper = Api::unpooled(a.base());
    let gauge = |m: &Scrape| m.get("servicekit_connections");
    let mut before = f64::MAX;
    for _ in 0..5 {
        before = before.min(gauge(&Scrape::of(&scraper).await));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let addr = a_run.local_addr();
    let sockets: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    let sr = &scraper;
    eventually(
        "three more connections",
        Duration::from_secs(10),
        move || async move { gauge(&Scrape::of(sr).await) == before + 3.0 },
    )
    .await;
    drop(sockets);
    eventually(
        "the three closed",
        Duration::from_secs(10),
        move || async move { gauge(&Scrape::of(sr).await) == before },
    )
    .await;

    a_run.shutdown().await;
    b_run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_counts_expired_registrations() {
    let mut config = Config::for_tests();
    config.ttl_seconds = 1;
    let (running, api) = start(config).await;
    api.register("http://svca:8000", "A").await;
    api.register("http://svcb:8000", "B").await;
    assert_eq!(Scrape::of(&api).await.get("servicekit_registrations"), 2.0);
    let api = &api;
    eventually(
        "the sweeper drops both",
        Duration::from_secs(15),
        move || async move {
            let m = Scrape::of(api).await;
            m.get("servicekit_registrations_expired_total") == 2.0
                && m.get("servicekit_registrations") == 0.0
        },
    )
    .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_a_shared_valkey_registry() {
    let mut valkey = ValkeyServer::new();
    let mut config = Config::for_tests();
    config.valkey_url = Some(valkey.url());
    config.key_prefix = format!("test:{}:", ulid::Ulid::new());
    let (a_run, a) = start(config.clone()).await;
    let (b_run, b) = start(config).await;
    for i in 0..3 {
        a.register(&format!("http://svc{i}:8000"), "S").await;
    }
    // The count is the shared registry's, whichever orchestrator is asked; the request
    // counts are each orchestrator's own.
    assert_eq!(b.get("/health").await.status, 200);
    let mb = Scrape::of(&b).await;
    mb.assert_families();
    assert_eq!(mb.get("servicekit_registrations"), 3.0);
    assert_eq!(mb.requests("/services/$register", 201), 0.0);
    assert_eq!(
        Scrape::of(&a).await.requests("/services/$register", 201),
        3.0
    );
    assert_eq!(mb.get("servicekit_valkey_reconnects_total"), 0.0);

    // Valkey restarts: the connection comes back, and that is counted.
    valkey.stop();
    valkey.start();
    let ar = &a;
    eventually(
        "a reconnect counted",
        Duration::from_secs(20),
        move || async move {
            let r = ar.get("/metrics").await;
            let text = String::from_utf8_lossy(&r.body).into_owned();
            text.lines()
                .any(|l| l == "servicekit_valkey_reconnects_total 1")
        },
    )
    .await;
    a_run.shutdown().await;
    b_run.shutdown().await;
}

/// `INFO memory`'s `used_memory`, in bytes.
async fn used_memory(store: &ValkeyStore) -> u64 {
    let info: String = store
        .client()
        .info(Some(InfoKind::Memory))
        .await
        .expect("INFO memory");
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no used_memory in {info}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_degraded_while_valkey_refuses_writes() {
    let valkey = ValkeyServer::new();
    let mut config = Config::for_tests();
    config.valkey_url = Some(valkey.url());
    config.key_prefix = format!("test:{}:", ulid::Ulid::new());
    let (running, api) = start(config.clone()).await;
    let reg = api.register("http://svca:8000", "A").await;
    let id = reg["id"].as_str().expect("id").to_owned();
    let health: Value = api.get("/health").await.json();
    assert_eq!(health["status"], "healthy", "{health}");

    // A full Valkey that evicts nothing: 1 MiB of filler, then a memory limit half a MiB
    // above what it used before the filler. Margins of 512 KiB either way, so connections
    // coming and going (each costs some KiB) do not decide the outcome.
    let probe = ValkeyStore::connect(&valkey.url(), "probe:", Duration::from_secs(60))
        .await
        .expect("probe connects");
    let before = used_memory(&probe).await;
    let filler = "f".repeat(32 * 1024);
    let filled: Vec<String> = (0..32).map(|i| format!("filler:{i}")).collect();
    for key in &filled {
        assert_eq!(valkey.command(&["SET", key, &filler]), "+OK");
    }
    assert_eq!(
        valkey.command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]),
        "+OK"
    );
    let limit = before + 512 * 1024;
    assert_eq!(
        valkey.command(&["CONFIG", "SET", "maxmemory", &limit.to_string()]),
        "+OK"
    );
    assert!(valkey.command(&["SET", "tiny", "1"]).starts_with("-OOM"));

    let r = api.get("/health").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("1"));
    let health: Value = r.json();
    assert_eq!(health["status"], "degraded", "{health}");
    let store = &health["checks"]["store"];
    assert_eq!(store["status"], "degraded", "{health}");
    assert_eq!(store["kind"], "valkey");
    assert_eq!(store["writable"], false);
    let error = store["error"].as_str().expect("an error text");
    assert!(error.contains("OOM"), "{error}");
    // Writes fail the same way; reads still work.
    api.post_json(
        "/services/$register",
        &json!({"url": "http://svcb:8000", "info": {"display_name": "B"}}),
    )
    .await
    .assert_problem(503, t::STORE_UNAVAILABLE);
    api.put(&format!("/services/{id}/$ping"))
        .await
        .assert_problem(503, t::STORE_UNAVAILABLE);
    assert_eq!(api.get(&format!("/services/{id}")).await.status, 200);

    // Memory freed: healthy again, and registrations work.
    for key in &filled {
        assert_eq!(valkey.command(&["DEL", key]), ":1");
    }
    let health: Value = api.get("/health").await.json();
    assert_eq!(health["status"], "healthy", "{health}");
    api.register("http://svcb:8000", "B").await;
    probe.close().await;
    running.shutdown().await;
}

/// The forged log line the attacks below try to start.
const FORGED: &str = "2026-01-01T00:00:00Z INFO service.deregistered id=forged";

/// A child orchestrator whose stdout and stderr lines (raw bytes) arrive on a channel.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<Vec<u8>>,
}

impl Proc {
    fn spawn(format: &str) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
            .args(["--bind", "127.0.0.1:0", "--log-format", format])
            .env_remove("VALKEY_URL")
            .env_remove("ORCHESTRATOR_REGISTRATION_KEY")
            .env_remove("LOG_FORMAT")
            // Debug: the request spans (with their paths) are logged too.
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("orchestrator binary starts");
        let (tx, lines) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).split(b'\n').map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Proc { child, lines }
    }

    /// The listening address, from the start line (either format), and the lines read so far.
    fn bind(&self) -> (String, Vec<Vec<u8>>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no start line; saw {seen:?}"));
            let text = String::from_utf8_lossy(&line).into_owned();
            seen.push(line);
            if text.contains("orchestrator.starting") {
                let at = text.find("127.0.0.1:").expect("bind address logged");
                let addr: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                    .collect();
                return (addr, seen);
            }
        }
    }

    /// Stops it with SIGTERM and returns every line it wrote.
    fn finish(mut self, mut seen: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Both pipes close at exit, which ends the readers.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            seen.push(line);
        }
        seen
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends every forging attempt to the orchestrator at `addr`.
async fn attack(addr: &str) {
    let api = Api::new(format!("http://{addr}"));
    let forging = format!("x\n{FORGED}");
    // In the display name: refused.
    for name in [
        forging.clone(),
        format!("x\r{FORGED}"),
        "\u{1b}[2J\u{1b}[31mred".into(),
    ] {
        api.post_json(
            "/services/$register",
            &json!({"url": "http://svcn:8000", "info": {"display_name": name}}),
        )
        .await
        .assert_problem(400, t::BAD_REQUEST);
    }
    // In info: accepted (it is free-form data) and never logged.
    let r = api
        .post_json(
            "/services/$register",
            &json!({"url": "http://svca:8000",
                    "info": {"display_name": "A", "description": forging, "x": "\u{1b}[31m"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    // In URLs: the url crate drops tabs and newlines and percent-encodes other controls, so the
    // registered (and logged) URL is one line without escapes.
    let mut ids = Vec::new();
    for url in [
        format!("http://svcb:8000/a\n{FORGED}"),
        format!("http://svcc:8000/\u{1b}[31m/?q=\r\n{FORGED}"),
    ] {
        let r = api
            .post_json(
                "/services/$register",
                &json!({"url": url, "info": {"display_name": "B"}}),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        let v: Value = r.json();
        ids.push(v["id"].as_str().expect("id").to_owned());
    }
    // In a request path (logged in the debug request span): percent-encoded on the wire.
    let path =
        "/services/x%0A2026-01-01T00:00:00Z%20INFO%20service.deregistered%20id=forged%1B[31m";
    assert_eq!(api.get(path).await.status, 404);
    // Deregistration logs the URL.
    for id in ids {
        assert_eq!(api.delete(&format!("/services/{id}")).await.status, 200);
    }
}

/// No line starts with the forged timestamp, and no raw escape or carriage return is written.
fn assert_unforged(format: &str, lines: &[Vec<u8>]) {
    let text: Vec<String> = lines
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    let all = text.join("\n");
    for line in &text {
        assert!(
            !line.trim_start().starts_with("2026-01-01T00:00:00Z"),
            "{format}: a forged line: {line:?}\nin:\n{all}"
        );
    }
    for line in lines {
        assert!(
            !line.iter().any(|b| *b == 0x1b || *b == b'\r'),
            "{format}: a raw ESC or CR in {:?}",
            String::from_utf8_lossy(line)
        );
    }
    // Not vacuous: the forged text did reach the log, inside other lines.
    assert!(
        text.iter().any(|l| l.contains("2026-01-01T00:00:00Z")),
        "{format}: the attack never reached the log:\n{all}"
    );
    assert!(all.contains("service.deregistered"), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_text_cannot_forge_log_lines_in_either_format() {
    for format in ["pretty", "json"] {
        let proc = Proc::spawn(format);
        let (addr, seen) = proc.bind();
        attack(&addr).await;
        let lines = proc.finish(seen);
        assert_unforged(format, &lines);
        if format == "json" {
            for line in &lines {
                let line = String::from_utf8_lossy(line);
                let _: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
            }
        }
    }
}
