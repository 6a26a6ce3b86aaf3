//! Watch feed benchmark: how fast a change reaches watchers, and what many watchers cost.
//!
//! ```sh
//! cargo bench --bench watch                          # 1,000 and 10,000 watchers, 10 s at 100 changes/s
//! WATCHERS=1000 WATCH_SECS=5 cargo bench --bench watch
//! cargo bench --bench watch -- --test                # smoke: 50 watchers, 1 s
//! ```
//!
//! It starts what it needs: a `valkey-server` on a free port and two orchestrator replicas on
//! it, plus one orchestrator on the memory store, each as a child process (this binary re-run
//! with `--serve-orchestrator`) so that its memory and CPU are its own.
//!
//! - **Propagation**: a watcher on replica A and one on replica B; registrations and
//!   deregistrations through A, one at a time; the time from sending the request to the event
//!   at each watcher, p50/p99, against the request's own round trip measured in the same run
//!   (the baseline: an event cannot arrive before the write that causes it is done).
//! - **Fan-out**: W watchers on one orchestrator, each filtering one of ten display names, then
//!   100 registrations/s spread over the names for the phase: the orchestrator's RSS per
//!   watcher, its CPU (share of one core), and the latency from request to event at 50 sampled
//!   watchers, against the same latency with one watcher per name measured first.

#[allow(dead_code)]
mod common;
#[allow(dead_code)]
#[path = "../orchestrator/tests/support/valkey.rs"]
mod valkey;

use std::collections::HashMap;

use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use common::{connect, cpu_time, env_num, rss, send};

/// Display names the fan-out watchers filter on.
const NAMES: usize = 10;
/// Sampled watchers per name in the fan-out phase.
const SAMPLED_PER_NAME: usize = 5;
/// Changes per second in the fan-out phase.
const CHANGE_RATE: u64 = 100;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--serve-orchestrator") {
        return common::serve_orchestrator();
    }
    let quick = common::quick(&args);
    let watchers: Vec<usize> = if quick {
        vec![50]
    } else {
        std::env::var("WATCHERS")
            .ok()
            .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![1_000, 10_000])
    };
    let secs = if quick { 1 } else { env_num("WATCH_SECS", 10) } as u64;
    let rounds = if quick {
        20
    } else {
        env_num("WATCH_ROUNDS", 200)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(&watchers, Duration::from_secs(secs), rounds));
}

/// An orchestrator child process and its address.
struct Orchestrator {
    child: Child,
    addr: String,
}

impl Orchestrator {
    fn start(valkey_url: Option<&str>) -> Orchestrator {
        let mut envs = vec![
            ("ORCHESTRATOR_KEY_PREFIX", "bench:".to_owned()),
            ("ORCHESTRATOR_TTL_SECONDS", "3600".to_owned()),
            ("ORCHESTRATOR_MAX_WATCHERS", "20000".to_owned()),
            ("ORCHESTRATOR_MAX_CONNECTIONS", "25000".to_owned()),
        ];
        if let Some(url) = valkey_url {
            envs.push(("VALKEY_URL", url.to_owned()));
        }
        let (child, addr) = common::spawn_orchestrator(&envs);
        Orchestrator { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time used so far (user + system).
    fn cpu(&self) -> Duration {
        cpu_time(&self.pid().to_string())
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// One parsed SSE message: its event and the `url` of its data.
struct Event {
    kind: String,
    url: String,
    at: Instant,
}

/// Opens a watch on `addr` for `query` and forwards the events it sees, when `sampled`, to
/// `events`; counts every event in `seen`. Returns once the snapshot arrived, with the task
/// that reads the feed (aborting it closes the connection).
async fn watch(
    addr: &str,
    query: &str,
    sampled: Option<mpsc::UnboundedSender<Event>>,
    seen: Arc<AtomicUsize>,
) -> Reader {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get(format!("/services?watch=true&{query}"))
        .header("host", "bench")
        .header("accept", "text/event-stream")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let res = sender.send_request(req).await.expect("watch answers");
    assert_eq!(res.status(), 200, "watch refused");
    let mut body = res.into_body();
    let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(async move {
        let _sender = sender; // the connection lives as long as this task
        let mut synced = Some(synced_tx);
        let mut buf: Vec<u8> = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let Some(events) = &sampled else {
                // Unsampled: count events cheaply (the client must not be the bottleneck),
                // keeping a few bytes so a marker cut between two frames still counts.
                buf.extend_from_slice(&data);
                let mut counted = 0;
                let mut at = 0;
                while let Some(i) = find(&buf[at..], b"\nevent: ") {
                    let start = at + i + 8;
                    if buf.len() < start + 8 {
                        break;
                    }
                    if &buf[start..start + 8] == b"snapshot" {
                        if let Some(tx) = synced.take() {
                            let _ = tx.send(());
                        }
                    } else {
                        counted += 1;
                    }
                    at = start;
                }
                seen.fetch_add(counted, Ordering::Relaxed);
                // A marker not yet counted lies within the last 16 bytes or after `at`.
                let keep_from = at.max(buf.len().saturating_sub(16));
                buf.drain(..keep_from);
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(end) = find(&buf, b"\n\n") {
                let message: Vec<u8> = buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&message);
                let mut kind = None;
                let mut data = "";
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        kind = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = v;
                    }
                }
                let Some(kind) = kind else { continue }; // a comment or the retry hint
                if kind == "snapshot" {
                    if let Some(tx) = synced.take() {
                        let _ = tx.send(());
                    }
                    continue;
                }
                seen.fetch_add(1, Ordering::Relaxed);
                let url = serde_json::from_str::<serde_json::Value>(data)
                    .ok()
                    .and_then(|v| v["url"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                let _ = events.send(Event {
                    kind,
                    url,
                    at: Instant::now(),
                });
            }
        }
    });
    synced_rx.await.expect("snapshot");
    Reader(reader)
}

/// The task reading one watch; aborting it closes the connection.
struct Reader(tokio::task::JoinHandle<()>);

impl Reader {
    fn abort(&self) {
        self.0.abort();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn registration(url: &str, name: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "url": url,
        "info": {"display_name": name, "version": "1.0.0", "team": "platform"}
    }))
    .expect("json")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits for the event `kind` of `url` on `rx`, skipping others.
async fn event_for(rx: &mut mpsc::UnboundedReceiver<Event>, kind: &str, url: &str) -> Instant {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) if e.kind == kind && e.url == url => return e.at,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("no {kind} event for {url} within 10 s"),
        }
    }
}

async fn run(watchers: &[usize], duration: Duration, rounds: usize) {
    let valkey = valkey::ValkeyServer::new();
    let a = Orchestrator::start(Some(&valkey.url()));
    let b = Orchestrator::start(Some(&valkey.url()));
    println!(
        "machine: {} cores; replicas A {} and B {} on valkey {}",
        common::cores(),
        a.addr,
        b.addr,
        valkey.url()
    );
    propagation(&a, &b, rounds).await;
    drop((a, b));

    let memory = Orchestrator::start(None);
    for &w in watchers {
        fan_out(&memory, w, duration).await;
    }
}

async fn propagation(a: &Orchestrator, b: &Orchestrator, rounds: usize) {
    let seen = Arc::new(AtomicUsize::new(0));
    let (tx_a, mut rx_a) = mpsc::unbounded_channel();
    let (tx_b, mut rx_b) = mpsc::unbounded_channel();
    let on_a = watch(&a.addr, "display_name=prop", Some(tx_a), seen.clone()).await;
    let on_b = watch(&b.addr, "display_name=prop", Some(tx_b), seen.clone()).await;
    let mut sender = connect(&a.addr).await;
    let mut request = Vec::new();
    let (mut same, mut other) = (Vec::new(), Vec::new());
    let mut ids = Vec::new();
    for kind in ["registered", "deregistered"] {
        for i in 0..rounds {
            let url = format!("http://10.9.{}.{}:8000", i / 256, i % 256);
            let started = Instant::now();
            let (status, body) = if kind == "registered" {
                send(
                    &mut sender,
                    "POST",
                    "/services/$register",
                    Some(registration(&url, "prop")),
                )
                .await
            } else {
                send(
                    &mut sender,
                    "DELETE",
                    &format!("/services/{}", ids[i]),
                    None,
                )
                .await
            };
            request.push(started.elapsed());
            assert!(status < 300, "{kind} {url}: {status}");
            if kind == "registered" {
                let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
                ids.push(v["id"].as_str().expect("id").to_owned());
            }
            same.push(event_for(&mut rx_a, kind, &url).await - started);
            other.push(event_for(&mut rx_b, kind, &url).await - started);
        }
    }
    on_a.abort();
    on_b.abort();
    for v in [&mut request, &mut same, &mut other] {
        v.sort_unstable();
    }
    let line = |what: &str, v: &[Duration]| {
        println!(
            "propagation {what}: p50 {:.2} ms, p99 {:.2} ms ({} changes)",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99)),
            v.len()
        )
    };
    line("request round trip (baseline)", &request);
    line("to a watcher on the same replica", &same);
    line("to a watcher on the other replica", &other);
    println!(
        "propagation p50 ratio to the request: same replica {:.2}, other replica {:.2}",
        ms(percentile(&same, 0.5)) / ms(percentile(&request, 0.5)),
        ms(percentile(&other, 0.5)) / ms(percentile(&request, 0.5)),
    );
}

/// Registers at [`CHANGE_RATE`] for `duration` on `addr`, names round-robin, and returns when
/// each registration was sent, by URL.
async fn drive_changes(addr: &str, duration: Duration, tag: &str) -> HashMap<String, Instant> {
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / CHANGE_RATE));
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    let mut i = 0usize;
    while Instant::now() < end {
        ticker.tick().await;
        let (addr, sent) = (addr.to_owned(), sent.clone());
        let url = format!("http://{tag}-{i}.bench:8000");
        let name = format!("fan-{}", i % NAMES);
        i += 1;
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(&addr).await;
            let started = Instant::now();
            let (status, _) = send(
                &mut sender,
                "POST",
                "/services/$register",
                Some(registration(&url, &name)),
            )
            .await;
            assert!(status < 300, "register {url}: {status}");
            sent.lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(url, started);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let sent = sent.lock().unwrap_or_else(|e| e.into_inner()).clone();
    sent
}

async fn fan_out(orch: &Orchestrator, watchers: usize, duration: Duration) {
    let rss_before = rss(orch.pid(), "VmRSS");
    let seen = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let connected = Instant::now();
    let mut readers = Vec::with_capacity(watchers);
    let mut per_name = [0usize; NAMES];
    // Sampled watchers first, then the rest, ten connections at a time.
    for (name, count) in per_name.iter_mut().enumerate() {
        for _ in 0..SAMPLED_PER_NAME.min(watchers / NAMES) {
            let query = format!("display_name=fan-{name}");
            readers.push(watch(&orch.addr, &query, Some(tx.clone()), seen.clone()).await);
            *count += 1;
        }
    }
    while readers.len() < watchers {
        let batch: Vec<_> = (readers.len()..(readers.len() + 10).min(watchers))
            .map(|i| {
                per_name[i % NAMES] += 1;
                let (addr, seen) = (orch.addr.clone(), seen.clone());
                tokio::spawn(async move {
                    watch(
                        &addr,
                        &format!("display_name=fan-{}", i % NAMES),
                        None,
                        seen,
                    )
                    .await
                })
            })
            .collect();
        for t in batch {
            readers.push(t.await.expect("watcher"));
        }
    }
    let rss_watching = rss(orch.pid(), "VmRSS");
    println!(
        "fan-out, {watchers} watchers: connected and snapshotted in {:.1} s; orchestrator RSS {} → {} KiB, {:.1} KiB per watcher",
        connected.elapsed().as_secs_f64(),
        rss_before,
        rss_watching,
        (rss_watching.saturating_sub(rss_before)) as f64 / watchers as f64
    );

    let cpu_before = orch.cpu();
    let own_cpu_before = cpu_time("self");
    let started = Instant::now();
    let tag = format!("w{watchers}");
    let sent = drive_changes(&orch.addr, duration, &tag).await;
    // Let the last events arrive.
    let expected_total: usize = sent
        .keys()
        .filter_map(|url| {
            url.split('-')
                .nth(1)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|i| per_name[i % NAMES])
        .sum();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.load(Ordering::Relaxed) < expected_total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wall = started.elapsed();
    let cpu = orch.cpu().saturating_sub(cpu_before);
    let own_cpu = cpu_time("self").saturating_sub(own_cpu_before);
    drop(tx);
    let mut latencies = Vec::new();
    while let Ok(e) = rx.try_recv() {
        if let Some(at) = sent.get(&e.url) {
            latencies.push(e.at.saturating_duration_since(*at));
        }
    }
    latencies.sort_unstable();
    println!(
        "fan-out, {watchers} watchers, {} changes at {CHANGE_RATE}/s: {} of {} events delivered; orchestrator CPU {:.0}% of a core (this client {:.0}%); latency at {} sampled watchers p50 {:.2} ms, p99 {:.2} ms; RSS {} KiB",
        sent.len(),
        seen.load(Ordering::Relaxed),
        expected_total,
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
        100.0 * own_cpu.as_secs_f64() / wall.as_secs_f64(),
        (SAMPLED_PER_NAME * NAMES).min(watchers),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        rss(orch.pid(), "VmRSS")
    );
    for r in readers {
        r.abort();
    }
}
