//! The `orchestrator` binary as users run it: flags, logs, serving, and SIGTERM.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use support::http::Api;

const VARS: [&str; 8] = [
    "ORCHESTRATOR_BIND",
    "VALKEY_URL",
    "ORCHESTRATOR_KEY_PREFIX",
    "ORCHESTRATOR_TTL_SECONDS",
    "ORCHESTRATOR_PUBLIC_URL",
    "ORCHESTRATOR_REGISTRATION_KEY",
    "ORCHESTRATOR_MAX_BODY_BYTES",
    "LOG_FORMAT",
];

fn orchestrator() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orchestrator"));
    for var in VARS {
        cmd.env_remove(var);
    }
    cmd.env_remove("RUST_LOG");
    cmd
}

/// A child orchestrator whose JSON log lines arrive on a channel; killed on drop.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .env("LOG_FORMAT", "json")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("orchestrator binary starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    /// Waits for the log event `message`, failing after `within`.
    fn event(&self, message: &str, within: Duration) -> Value {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if v["message"] == message => return v,
                Ok(_) => continue,
                Err(_) => panic!("no {message} log event within {within:?}"),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn serves_on_the_memory_store_and_exits_cleanly_on_sigterm() {
    let mut cmd = orchestrator();
    cmd.args(["--bind", "127.0.0.1:0", "--ttl-seconds", "7"]);
    let mut proc = Proc::spawn(cmd);
    let started = proc.event("orchestrator.starting", Duration::from_secs(20));
    assert_eq!(started["store"], "memory");
    assert_eq!(started["ttl_seconds"], 7);
    let bind = started["bind"].as_str().expect("bind logged").to_owned();

    let api = Api::new(format!("http://{bind}"));
    assert_eq!(api.get("/health").await.status, 200);
    let reg = api.register("http://svca:8000", "A").await;
    assert_eq!(reg["ttl_seconds"], 7);
    let registered = proc.event("service.registered", Duration::from_secs(5));
    assert_eq!(registered["url"], "http://svca:8000");
    // A name with control characters is refused (a terminal showing the pretty log format
    // would obey them; tests/ops.rs has the log-forging attacks).
    let r = api
        .post_json(
            "/services/$register",
            &serde_json::json!({"url": "http://svcb:8000", "info": {"display_name": "B\u{1b}[31m\nX"}}),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");

    proc.signal("TERM");
    let status = proc.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn sigint_also_stops_it_cleanly() {
    let mut cmd = orchestrator();
    cmd.args(["--bind", "127.0.0.1:0"]);
    let mut proc = Proc::spawn(cmd);
    proc.event("orchestrator.starting", Duration::from_secs(20));
    proc.signal("INT");
    assert!(proc.wait_exit(Duration::from_secs(15)).success());
}

#[test]
fn environment_variables_configure_it() {
    let mut cmd = orchestrator();
    cmd.env("ORCHESTRATOR_BIND", "127.0.0.1:0")
        .env("ORCHESTRATOR_TTL_SECONDS", "11")
        .env("ORCHESTRATOR_PUBLIC_URL", "http://orch:9000/");
    let proc = Proc::spawn(cmd);
    let started = proc.event("orchestrator.starting", Duration::from_secs(20));
    assert_eq!(started["ttl_seconds"], 11);
    assert_eq!(started["public_url"], "http://orch:9000");
    assert!(started["bind"].as_str().unwrap().starts_with("127.0.0.1:"));
}

#[test]
fn help_documents_every_flag_and_variable() {
    let out = orchestrator().arg("--help").output().expect("runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--bind",
        "ORCHESTRATOR_BIND",
        "0.0.0.0:9000",
        "--valkey-url",
        "VALKEY_URL",
        "--ttl-seconds",
        "ORCHESTRATOR_TTL_SECONDS",
        "--public-url",
        "ORCHESTRATOR_PUBLIC_URL",
        "--registration-key",
        "ORCHESTRATOR_REGISTRATION_KEY",
        "--admin-key",
        "ORCHESTRATOR_ADMIN_KEY",
        "--require-lease",
        "ORCHESTRATOR_REQUIRE_LEASE",
        "--max-body-bytes",
        "ORCHESTRATOR_MAX_BODY_BYTES",
        "65536",
        "--log-format",
        "LOG_FORMAT",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

/// Secrets the tests below hand the binary; none may come out.
const VALKEY_PASSWORD: &str = "hunter2-valkey-password";
const REGISTRATION_KEY: &str = "hunter2-registration-key";
const ADMIN_KEY: &str = "hunter2-admin-key";

#[test]
fn help_prints_no_secret_from_the_environment() {
    for args in [vec!["--help"], vec!["-h"], vec!["healthcheck", "--help"]] {
        let out = orchestrator()
            .args(&args)
            .env(
                "VALKEY_URL",
                format!("redis://admin:{VALKEY_PASSWORD}@valkey:6379/0"),
            )
            .env("ORCHESTRATOR_REGISTRATION_KEY", REGISTRATION_KEY)
            .env("ORCHESTRATOR_ADMIN_KEY", ADMIN_KEY)
            .output()
            .expect("runs");
        assert!(out.status.success(), "{args:?}");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for secret in [VALKEY_PASSWORD, REGISTRATION_KEY, ADMIN_KEY] {
            assert!(!text.contains(secret), "{args:?} prints {secret}:\n{text}");
        }
        if args[0] != "healthcheck" {
            assert!(text.contains("VALKEY_URL"), "{text}");
        }
    }
}

#[test]
fn a_failed_start_logs_no_secret() {
    // A URL the Valkey client refuses: its error may quote the URL.
    let out = orchestrator()
        .args(["--bind", "127.0.0.1:0"])
        .env(
            "VALKEY_URL",
            format!("redis://admin:{VALKEY_PASSWORD}@[not-a-host:6379/0"),
        )
        .env("ORCHESTRATOR_REGISTRATION_KEY", REGISTRATION_KEY)
        .env("LOG_FORMAT", "json")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("orchestrator.failed"), "{log}");
    for secret in [VALKEY_PASSWORD, REGISTRATION_KEY] {
        assert!(!log.contains(secret), "the log shows {secret}:\n{log}");
    }
}

#[test]
fn bad_configuration_fails_with_a_clear_message() {
    for (args, needle) in [
        (vec!["--ttl-seconds", "0"], "--ttl-seconds"),
        (vec!["--bind", "nowhere"], "--bind"),
        (vec!["--public-url", "ftp://x"], "--public-url"),
        (vec!["--log-format", "xml"], "--log-format"),
    ] {
        let out = orchestrator().args(&args).output().expect("runs");
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn a_busy_port_is_reported_and_exits_non_zero() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = orchestrator()
        .args(["--bind", &addr])
        .env("LOG_FORMAT", "json")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("orchestrator.failed") && log.contains(&addr),
        "{log}"
    );
}

#[test]
fn unusable_valkey_settings_are_reported_and_exit_non_zero() {
    for (args, needle) in [
        (
            vec!["--valkey-url", "http://valkey:6379"],
            "the scheme must be one of",
        ),
        (
            vec!["--valkey-url", "redis://127.0.0.1:1", "--key-prefix", "a{b"],
            "may not contain",
        ),
    ] {
        let out = orchestrator()
            .args(["--bind", "127.0.0.1:0"])
            .args(&args)
            .env("LOG_FORMAT", "json")
            .output()
            .expect("runs");
        assert!(!out.status.success(), "{args:?} accepted");
        let log = String::from_utf8_lossy(&out.stdout);
        assert!(
            log.contains("orchestrator.failed") && log.contains(needle),
            "{args:?}: {log}"
        );
    }
}

#[tokio::test]
async fn keeps_serving_and_obeys_sigterm_after_its_log_reader_goes_away() {
    let mut child = orchestrator()
        .args(["--bind", "127.0.0.1:0"])
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let bind = loop {
        let line = lines.next().expect("a log line").expect("readable");
        let v: Value = serde_json::from_str(&line).expect("json log");
        if v["message"] == "orchestrator.starting" {
            break v["bind"].as_str().expect("bind").to_owned();
        }
    };
    // Whoever read the logs is gone: both pipes are closed.
    drop(lines);
    drop(child.stderr.take());
    let api = Api::new(format!("http://{bind}"));
    // Requests that log still work (several, to overflow any buffer).
    for i in 0..50 {
        api.register(&format!("http://svc{i}:8000"), "A").await;
    }
    assert_eq!(api.get("/health").await.status, 200);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait") {
            break exit;
        }
        assert!(std::time::Instant::now() < deadline, "SIGTERM was ignored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
}

/// `orchestrator healthcheck`, with no inherited configuration.
fn healthcheck() -> Command {
    let mut cmd = orchestrator();
    cmd.env_remove("ORCHESTRATOR_HEALTHCHECK_URL")
        .env_remove("ORCHESTRATOR_MAX_CONNECTIONS")
        .arg("healthcheck");
    cmd
}

/// A port on which nothing listens (just released by the OS).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A server that answers every connection with `status` and `body` (None: reads the request,
/// never answers).
fn fake_server(answer: Option<(&str, &str)>) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let response = answer.map(|(status, body)| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        )
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            match &response {
                Some(response) => {
                    let _ = stream.write_all(response.as_bytes());
                }
                None => held.push(stream),
            }
        }
    });
    addr
}

#[test]
fn healthcheck_exits_0_against_a_healthy_orchestrator() {
    let mut cmd = orchestrator();
    cmd.args(["--bind", "127.0.0.1:0"]);
    let proc = Proc::spawn(cmd);
    let started = proc.event("orchestrator.starting", Duration::from_secs(20));
    let bind = started["bind"].as_str().expect("bind logged").to_owned();

    let url = format!("http://{bind}/health");
    let out = healthcheck().args(["--url", &url]).output().expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), format!("healthy: {url}"));

    // Without --url: /health on ORCHESTRATOR_BIND's port, as in the image's HEALTHCHECK.
    let out = healthcheck()
        .env("ORCHESTRATOR_BIND", &bind)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&url),
        "{out:?}"
    );
    // ... and from the environment variable.
    let out = healthcheck()
        .env("ORCHESTRATOR_HEALTHCHECK_URL", &url)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn healthcheck_exits_1_with_a_clear_message_when_nothing_listens() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/health");
    for mut cmd in [
        {
            let mut c = healthcheck();
            c.args(["--url", &url]);
            c
        },
        {
            let mut c = healthcheck();
            c.env("ORCHESTRATOR_BIND", format!("0.0.0.0:{port}"));
            c
        },
    ] {
        let out = cmd.output().expect("runs");
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            err.starts_with(&format!("unhealthy: {url}: ")) && err.contains("onnection refused"),
            "{err}"
        );
    }
}

#[test]
fn healthcheck_exits_1_on_an_unhealthy_wrong_or_missing_answer() {
    let unavailable = fake_server(Some((
        "503 Service Unavailable",
        r#"{"status":"unhealthy","checks":{"store":{"status":"unhealthy"}}}"#,
    )));
    let ok_but_unhealthy = fake_server(Some(("200 OK", r#"{"status":"unhealthy"}"#)));
    let not_json = fake_server(Some(("200 OK", "ok")));
    let silent = fake_server(None);
    for (addr, timeout, needle) in [
        (
            unavailable,
            "3",
            "HTTP 503 Service Unavailable, status \"unhealthy\"",
        ),
        (ok_but_unhealthy, "3", "HTTP 200 OK, status \"unhealthy\""),
        (not_json, "3", "no JSON \"status\""),
        (silent, "1", "no answer within 1s"),
    ] {
        let url = format!("http://{addr}/health");
        let started = std::time::Instant::now();
        let out = healthcheck()
            .args(["--url", &url, "--timeout-seconds", timeout])
            .output()
            .expect("runs");
        assert_eq!(out.status.code(), Some(1), "{url}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{url}: wanted {needle:?} in {err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{url}: took too long"
        );
    }
}

#[test]
fn healthcheck_usage_errors_exit_1_not_the_reserved_2() {
    let out = healthcheck()
        .args(["--url", "ftp://x"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--url"),
        "{out:?}"
    );
    // The server's own usage errors keep clap's status.
    let out = orchestrator().arg("--nonsense").output().expect("runs");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn help_lists_the_healthcheck_subcommand_and_its_flags() {
    let out = orchestrator().arg("--help").output().expect("runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("healthcheck"), "{help}");
    let out = healthcheck().arg("--help").output().expect("runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--url",
        "ORCHESTRATOR_HEALTHCHECK_URL",
        "--timeout-seconds",
        "[default: 3]",
    ] {
        assert!(
            help.contains(needle),
            "healthcheck --help lacks {needle}:\n{help}"
        );
    }
}

/// The README's cluster command, `VALKEY_URL=redis-cluster://h1:p1,h2:p2,h3:p3 orchestrator`,
/// with the addresses of a real local cluster: it serves, and `/health` reports the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_url_with_several_seeds_serves() {
    let cluster = tokio::task::block_in_place(support::cluster::ValkeyCluster::new);
    let seeds: Vec<String> = (0..3)
        .map(|i| format!("127.0.0.1:{}", cluster.port(i)))
        .collect();
    let mut cmd = orchestrator();
    cmd.env("VALKEY_URL", format!("redis-cluster://{}", seeds.join(",")))
        .args(["--bind", "127.0.0.1:0"]);
    let mut proc = Proc::spawn(cmd);
    let started = proc.event("orchestrator.starting", Duration::from_secs(20));
    assert_eq!(started["store"], "valkey");
    let bind = started["bind"].as_str().expect("bind logged").to_owned();
    let api = Api::new(format!("http://{bind}"));
    let health: Value = api.get("/health").await.json();
    assert_eq!(health["status"], "healthy", "{health}");
    assert_eq!(
        health["checks"]["store"]["cluster"]["state"], "ok",
        "{health}"
    );
    assert_eq!(
        health["checks"]["store"]["cluster"]["masters"], 3,
        "{health}"
    );
    api.register("http://svca:8000", "A").await;
    proc.signal("TERM");
    assert!(proc.wait_exit(Duration::from_secs(15)).success());
}
