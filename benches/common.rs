//! What the load benches share: the orchestrator as a child process, an HTTP/1 connection to
//! it, one request on it, a process's memory and CPU time from /proc, and a raw RESP connection
//! to Valkey for baselines and `INFO`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::TcpStream;
use ulid::Ulid;

/// A field of /proc/PID/status in KiB.
pub fn rss(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Registers `range` through the orchestrator at `addr` over `conns` HTTP/1.1 connections,
/// `body(i)` for each `i`, counting each in `done`; the ids, in no particular order.
pub async fn register_range(
    addr: &str,
    range: std::ops::Range<usize>,
    conns: usize,
    body: fn(usize) -> Vec<u8>,
    done: &Arc<AtomicUsize>,
) -> Vec<Ulid> {
    let next = Arc::new(AtomicUsize::new(range.start));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (addr, next, done, end) = (addr.to_owned(), next.clone(), done.clone(), range.end);
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(&addr).await;
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    return ids;
                }
                let (status, reply) =
                    send(&mut sender, "POST", "/services/$register", Some(body(i))).await;
                assert!(
                    status == 201 || status == 200,
                    "register: {status} {reply:?}"
                );
                let v: serde_json::Value = serde_json::from_slice(&reply).expect("json");
                ids.push(
                    v["id"]
                        .as_str()
                        .and_then(|s| Ulid::from_string(s).ok())
                        .expect("id"),
                );
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.expect("task"));
    }
    ids
}

/// CPU time (user + system) process `pid` (a number, or `self`) has used so far, from
/// /proc/PID/stat; zero when it cannot be read.
pub fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (in parentheses, and it may hold spaces): utime and stime
    // are fields 14 and 15 of stat, 12 and 13 after the name.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Duration::from_secs_f64((ticks(11) + ticks(12)) / clock_ticks())
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub async fn connect(addr: &str) -> SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

pub async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> (u16, Bytes) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "bench");
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("request");
    sender.ready().await.expect("connection ready");
    let res = sender.send_request(req).await.expect("answer");
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, body)
}

/// Whether to run the short smoke version: `cargo bench` passes `--bench`; `cargo test
/// --all-targets` (CI) does not, and `BENCH_QUICK` forces it.
pub fn quick(args: &[String]) -> bool {
    !args.iter().any(|a| a == "--bench")
        || args.iter().any(|a| a == "--test")
        || std::env::var_os("BENCH_QUICK").is_some()
}

/// A number from the environment variable `name`, else `default`.
pub fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The orchestrator side of [`spawn_orchestrator`]: this bench binary re-run with
/// `--serve-orchestrator`, configured by its flags' environment variables (`VALKEY_URL`,
/// `ORCHESTRATOR_*`) so the same bench measures an older build too. Prints `listening ADDR`,
/// serves until stdin closes.
pub fn serve_orchestrator() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        use clap::Parser;
        let config = servicekit_orchestrator::config::Config::try_parse_from([
            "orchestrator",
            "--bind",
            "127.0.0.1:0",
        ])
        .expect("configuration");
        let running = servicekit_orchestrator::server::start(config)
            .await
            .expect("orchestrator starts");
        println!("listening {}", running.local_addr());
        let _ = tokio::task::spawn_blocking(|| {
            let mut buf = [0u8; 1];
            let _ = std::io::Read::read(&mut std::io::stdin(), &mut buf);
        })
        .await;
        running.shutdown().await;
    });
}

/// Starts this bench binary as an orchestrator process of its own (so its memory and CPU are
/// its own) with `envs` (and no `VALKEY_URL` unless given); returns it and its address.
/// Dropping its stdin stops it.
pub fn spawn_orchestrator(envs: &[(&str, String)]) -> (Child, String) {
    let exe = std::env::current_exe().expect("own path");
    let mut cmd = Command::new(exe);
    cmd.arg("--serve-orchestrator")
        .env("RUST_LOG", "warn")
        .env_remove("VALKEY_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("orchestrator process");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("listening line");
    let addr = line.trim().trim_start_matches("listening ").to_owned();
    (child, addr)
}

/// `used_memory` of `INFO memory`, in bytes.
pub async fn used_memory(conn: &mut Resp) -> u64 {
    info_number(conn, "memory", "used_memory").await as u64
}

/// A numeric field of `INFO <section>` (`used_cpu_user` of `cpu`, ...).
pub async fn info_number(conn: &mut Resp, section: &str, field: &str) -> f64 {
    match conn.call(&[b"INFO", section.as_bytes()]).await {
        Reply::Bulk(text) => String::from_utf8_lossy(&text)
            .lines()
            .find_map(|l| {
                l.strip_prefix(field)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("INFO {section} has no {field}")),
        other => panic!("INFO: {other:?}"),
    }
}

/// A minimal RESP2 connection: enough for SCRIPT LOAD, EVALSHA and INFO.
pub struct Resp {
    reader: AsyncBufReader<TcpStream>,
}

#[derive(Debug)]
#[allow(dead_code)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Reply>),
}

impl Resp {
    pub async fn connect(port: u16) -> Resp {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("valkey");
        stream.set_nodelay(true).expect("nodelay");
        Resp {
            reader: AsyncBufReader::new(stream),
        }
    }

    pub async fn call(&mut self, args: &[&[u8]]) -> Reply {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.reader.get_mut().write_all(&out).await.expect("write");
        self.read().await
    }

    async fn read(&mut self) -> Reply {
        let mut line = String::new();
        self.reader.read_line(&mut line).await.expect("read");
        let line = line.trim_end();
        let (kind, rest) = line.split_at(1);
        match kind {
            "+" => Reply::Simple(rest.to_owned()),
            "-" => Reply::Error(rest.to_owned()),
            ":" => Reply::Int(rest.parse().expect("int")),
            "$" => {
                let len: i64 = rest.parse().expect("len");
                if len < 0 {
                    return Reply::Nil;
                }
                let mut buf = vec![0u8; len as usize + 2];
                self.reader.read_exact(&mut buf).await.expect("bulk");
                buf.truncate(len as usize);
                Reply::Bulk(buf)
            }
            "*" => {
                let len: i64 = rest.parse().expect("len");
                let mut items = Vec::new();
                for _ in 0..len.max(0) {
                    items.push(Box::pin(self.read()).await);
                }
                Reply::Array(items)
            }
            other => panic!("unexpected RESP type {other:?}"),
        }
    }
}

/// Pings random ids of `ids` through the orchestrator at `addr` over `conns` HTTP/1.1
/// connections for `duration`: (answered 200, other answers, latencies in µs).
pub async fn ping_phase(
    addr: &str,
    ids: Arc<Vec<Ulid>>,
    duration: Duration,
    conns: usize,
) -> (usize, usize, Vec<u32>) {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (addr, ids) = (addr.to_owned(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(&addr).await;
            let (mut ok, mut errors, mut lat) = (0usize, 0usize, Vec::with_capacity(100_000));
            let mut i = c * 7919;
            while Instant::now() < deadline {
                i = i.wrapping_add(104_729);
                let path = format!("/services/{}/$ping", ids[i % ids.len()]);
                let started = Instant::now();
                let (status, _) = send(&mut sender, "PUT", &path, None).await;
                lat.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                if status == 200 {
                    ok += 1
                } else {
                    errors += 1
                }
            }
            (ok, errors, lat)
        }));
    }
    let (mut ok, mut errors, mut lat) = (0, 0, Vec::new());
    for t in tasks {
        let (o, e, l) = t.await.expect("task");
        ok += o;
        errors += e;
        lat.extend(l);
    }
    (ok, errors, lat)
}
