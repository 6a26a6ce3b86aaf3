//! Connection handling through real sockets: idle connections are closed by their deadlines
//! and cannot lock clients out, idle limits for HTTP/1 and HTTP/2, the per-peer cap, and the
//! problem+json answers for over-long request heads.
//!
//! The deadlines here are short (1 s) and every wait is bounded by a generous 15 s: the tests
//! check that a connection is closed, never how fast.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use servicekit::protocol::problem_type as t;
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server::{self, Running};
use support::http::Api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at, Instant};

/// How long any one condition may take to come true before the test fails.
const PATIENCE: Duration = Duration::from_secs(15);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

async fn start(configure: impl FnOnce(&mut Config)) -> Running {
    let mut config = Config::for_tests();
    configure(&mut config);
    server::start(config).await.expect("orchestrator starts")
}

/// Reads until the server closes the connection (EOF or reset); fails after `deadline`.
async fn closed_by_server(mut socket: TcpStream, deadline: Instant, what: &str) {
    let mut sink = Vec::new();
    match timeout_at(deadline, socket.read_to_end(&mut sink)).await {
        Ok(_) => {} // EOF, or a reset: closed either way.
        Err(_) => panic!("{what}: still open after the deadline"),
    }
}

/// Sends `request` on a fresh connection and returns the status, the raw head and the body
/// of the answer, read until the server closes.
async fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String, Vec<u8>) {
    let mut socket = TcpStream::connect(addr).await.expect("connect");
    socket.write_all(request).await.expect("send");
    let mut answer = Vec::new();
    timeout(PATIENCE, socket.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read");
    split_answer(&answer)
}

fn split_answer(answer: &[u8]) -> (u16, String, Vec<u8>) {
    let text = String::from_utf8_lossy(answer);
    let (head, _) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete answer head: {text:?}"));
    let body = answer[head.len() + 4..].to_vec();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, head.to_ascii_lowercase(), body)
}

fn assert_problem(answer: &(u16, String, Vec<u8>), status: u16, kind: &str) {
    let (code, head, body) = answer;
    assert_eq!(*code, status, "{head}");
    assert!(
        head.contains("content-type: application/problem+json"),
        "{head}"
    );
    let problem: Value = serde_json::from_slice(body).expect("a JSON body");
    assert_eq!(problem["type"], kind, "{problem}");
    assert_eq!(problem["status"], status, "{problem}");
}

#[tokio::test]
async fn idle_connections_are_closed_and_do_not_lock_clients_out() {
    let running = start(|c| {
        c.max_connections = 200;
        c.header_timeout_seconds = 1;
    })
    .await;
    let addr = running.local_addr();
    // 300 connections that never complete a request: 200 fill the cap, 100 wait in the
    // listen backlog behind them.
    let mut idle = Vec::new();
    for i in 0..300 {
        let mut socket = TcpStream::connect(addr).await.expect("connect");
        match i % 3 {
            0 => {}
            1 => socket
                .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                .await
                .expect("send a partial head"),
            _ => socket
                .write_all(H2_PREFACE)
                .await
                .expect("send the HTTP/2 preface"),
        }
        idle.push(socket);
    }
    let deadline = Instant::now() + PATIENCE;

    // A fresh client gets its answer once the idle ones have been closed.
    let api = Api::new(running.base_url());
    let health = timeout_at(deadline, api.get("/health"))
        .await
        .expect("/health answers while idle connections come and go");
    assert_eq!(health.status, 200);

    let mut closing = JoinSet::new();
    for (i, socket) in idle.into_iter().enumerate() {
        closing.spawn(closed_by_server(
            socket,
            deadline,
            ["silent", "partial head", "HTTP/2 preface"][i % 3],
        ));
    }
    while let Some(done) = closing.join_next().await {
        done.expect("every idle connection is closed by the server");
    }
    running.shutdown().await;
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_limit() {
    // A long header timeout: only the idle limit can close this connection.
    let running = start(|c| {
        c.header_timeout_seconds = 300;
        c.idle_timeout_seconds = 1;
    })
    .await;
    let socket = TcpStream::connect(running.local_addr())
        .await
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(socket))
            .await
            .expect("HTTP/2 handshake");
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("{}/health", running.base_url()))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let res = sender.send_request(req).await.expect("an answer");
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.expect("the body");

    let ended = timeout(PATIENCE, conn)
        .await
        .expect("the idle HTTP/2 connection is closed")
        .expect("the connection task");
    // A graceful close (GOAWAY), not a cut connection.
    assert!(ended.is_ok(), "{ended:?}");
    running.shutdown().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_its_answers_is_closed() {
    // An HTTP/2 client that grants no flow-control window: the answer's head arrives, its body
    // can never be sent, and the request stays in flight. It must not hold its permit for ever.
    let running = start(|c| {
        c.header_timeout_seconds = 1;
        c.idle_timeout_seconds = 1;
    })
    .await;
    let socket = TcpStream::connect(running.local_addr())
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .adaptive_window(false)
        .initial_stream_window_size(0)
        .handshake(TokioIo::new(socket))
        .await
        .expect("HTTP/2 handshake");
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("{}/health", running.base_url()))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let res = sender.send_request(req).await.expect("the answer's head");
    assert_eq!(res.status(), 200);
    // Never read the body. The stall limit is the idle timeout plus the server's grace for
    // slow handlers, then the close itself takes up to a header timeout.
    let stall = Duration::from_secs(1) + servicekit_orchestrator::connection::STALL_GRACE;
    let ended = timeout(stall + PATIENCE, conn).await;
    assert!(
        ended.is_ok(),
        "a connection whose answer cannot be sent is still open"
    );
    drop(res);
    running.shutdown().await;
}

#[tokio::test]
async fn a_kept_alive_http1_connection_is_closed_after_the_header_timeout() {
    // A long idle limit: only the header timer (which runs between requests) can close it.
    let running = start(|c| {
        c.header_timeout_seconds = 1;
        c.idle_timeout_seconds = 300;
    })
    .await;
    let mut socket = TcpStream::connect(running.local_addr())
        .await
        .expect("connect");
    // Two requests on one connection: it is kept alive between them.
    for _ in 0..2 {
        socket
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        // The health answer is small; read until its JSON body is complete.
        while !answer.ends_with(b"}") {
            let n = timeout(PATIENCE, socket.read(&mut buf))
                .await
                .expect("an answer in time")
                .expect("read");
            assert!(n > 0, "closed before answering");
            answer.extend_from_slice(&buf[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"));
    }
    closed_by_server(
        socket,
        Instant::now() + PATIENCE,
        "kept-alive HTTP/1 connection",
    )
    .await;
    running.shutdown().await;
}

#[tokio::test]
async fn the_per_peer_cap_closes_connections_over_it() {
    let running = start(|c| {
        c.max_connections_per_ip = 2;
        c.header_timeout_seconds = 300;
    })
    .await;
    let addr = running.local_addr();
    let first = TcpStream::connect(addr).await.expect("connect");
    let _second = TcpStream::connect(addr).await.expect("connect");
    let third = TcpStream::connect(addr).await.expect("connect");
    closed_by_server(third, Instant::now() + PATIENCE, "third connection").await;
    drop(first);
    // The first one's slot comes back once the server sees it closed.
    let api = Api::new(running.base_url());
    let deadline = Instant::now() + PATIENCE;
    loop {
        let attempt = timeout(Duration::from_secs(1), async {
            let mut socket = TcpStream::connect(addr).await.ok()?;
            socket
                .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut answer = Vec::new();
            socket.read_to_end(&mut answer).await.ok()?;
            answer.starts_with(b"HTTP/1.1 200").then_some(())
        })
        .await;
        if let Ok(Some(())) = attempt {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot never came back");
    }
    drop(api);
    running.shutdown().await;
}

#[tokio::test]
async fn over_long_heads_get_problem_json() {
    let running = start(|_| {}).await;
    let addr = running.local_addr();

    let target = format!("/services?display_name={}", "a".repeat(9 * 1024));
    let answer = exchange(
        addr,
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_problem(&answer, 414, t::URI_TOO_LONG);

    let filler = "a".repeat(20 * 1024);
    let answer = exchange(
        addr,
        format!(
            "GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: {filler}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_problem(&answer, 431, t::HEADER_FIELDS_TOO_LARGE);

    // The same over HTTP/2.
    let socket = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(socket))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    let req = http::Request::get(format!("{}/health", running.base_url()))
        .header("x-filler", &filler)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let res = sender.send_request(req).await.expect("an answer");
    assert_eq!(res.status(), 431);
    assert_eq!(
        res.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let body = res.into_body().collect().await.expect("body").to_bytes();
    let problem: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(problem["type"], t::HEADER_FIELDS_TOO_LARGE);

    // What stays hyper's own, bare answer: a head over its 64 KiB buffer, a malformed head.
    let filler = "a".repeat(70 * 1024);
    let answer = exchange(
        addr,
        format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: {filler}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(answer.0, 431, "{}", answer.1);
    assert!(answer.2.is_empty());
    let answer = exchange(addr, b"GET /health HTTP/1.1\r\nNo colon here\r\n\r\n").await;
    assert_eq!(answer.0, 400, "{}", answer.1);
    assert!(answer.2.is_empty());
    running.shutdown().await;
}
