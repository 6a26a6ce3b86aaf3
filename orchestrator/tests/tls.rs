//! Serving HTTPS: HTTP/2 and HTTP/1.1 through ALPN with certificates made at test time, start
//! errors for unusable certificate files, and the handshake deadline.
#![cfg(feature = "tls")]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use http::{Method, StatusCode, Version};
use serde_json::{json, Value};
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server::{self, Running};
use servicekit_orchestrator::tls::HANDSHAKE_TIMEOUT;
use support::tls::{request, Pki};
use tokio::io::AsyncReadExt;

fn tls_config(pki: &Pki) -> Config {
    let mut config = Config::for_tests();
    config.tls_cert = Some(pki.cert_path());
    config.tls_key = Some(pki.key_path());
    config
}

async fn start_tls(pki: &Pki) -> Running {
    server::start(tls_config(pki))
        .await
        .expect("TLS orchestrator starts")
}

#[tokio::test]
async fn serves_https_with_h2_and_http1_through_alpn() {
    let pki = Pki::new();
    let running = start_tls(&pki).await;
    let addr = running.local_addr();
    assert_eq!(running.base_url(), format!("https://{addr}"));

    for (i, (offered, version)) in [
        (&b"h2"[..], Version::HTTP_2),
        (&b"http/1.1"[..], Version::HTTP_11),
    ]
    .into_iter()
    .enumerate()
    {
        let what = String::from_utf8_lossy(offered);
        let health = request(
            pki.client_config(&[offered]),
            addr,
            Method::GET,
            "/health",
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(health.alpn.as_deref(), Some(offered), "{what}");
        assert_eq!(health.version, version, "{what}");
        assert_eq!(health.status, StatusCode::OK, "{what}: {health:?}");
        assert_eq!(health.body["status"], "healthy", "{what}");

        // URLs the orchestrator builds from the Host header / authority say https.
        let url = format!("http://svc{i}:8000");
        let body = json!({"url": url, "info": {"display_name": "over TLS"}});
        let registered = request(
            pki.client_config(&[offered]),
            addr,
            Method::POST,
            "/services/$register",
            Some(&body),
        )
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(registered.status, StatusCode::CREATED, "{registered:?}");
        let ping_url = registered.body["ping_url"].as_str().unwrap_or_default();
        assert!(
            ping_url.starts_with(&format!("https://localhost:{}/services/", addr.port())),
            "{what}: {ping_url}"
        );
    }

    // No ALPN at all: HTTP/1.1, as for any TLS client that does not ask.
    let plain = request(pki.client_config(&[]), addr, Method::GET, "/health", None)
        .await
        .expect("request without ALPN");
    assert_eq!(plain.alpn, None);
    assert_eq!(plain.version, Version::HTTP_11);
    assert_eq!(plain.status, StatusCode::OK);

    // A client that does not trust the certificate is refused in the handshake.
    let other = Pki::new();
    let refused = request(
        other.client_config(&[b"h2"]),
        addr,
        Method::GET,
        "/health",
        None,
    )
    .await
    .expect_err("a client trusting another CA");
    assert!(refused.contains("TLS handshake"), "{refused}");
    running.shutdown().await;
}

#[tokio::test]
async fn unusable_certificate_files_are_start_errors_naming_the_file() {
    let pki = Pki::new();
    let other = Pki::new();
    let missing = pki.dir.join("nope.crt");
    let empty = pki.write("empty.pem", "");
    let key_pem = std::fs::read_to_string(pki.key_path()).expect("key");
    let cert_pem = std::fs::read_to_string(pki.cert_path()).expect("cert");
    let key_as_cert = pki.write("key-as-cert.pem", &key_pem);
    let cert_as_key = pki.write("cert-as-key.pem", &cert_pem);
    let cases = [
        (
            Some(missing.clone()),
            Some(pki.key_path()),
            vec![missing.display().to_string(), "No such file".into()],
        ),
        (
            Some(empty.clone()),
            Some(pki.key_path()),
            vec![empty.display().to_string(), "no PEM certificate".into()],
        ),
        (
            Some(key_as_cert.clone()),
            Some(pki.key_path()),
            vec![
                key_as_cert.display().to_string(),
                "no PEM certificate".into(),
            ],
        ),
        (
            Some(pki.cert_path()),
            Some(cert_as_key.clone()),
            vec![
                cert_as_key.display().to_string(),
                "no PEM private key".into(),
            ],
        ),
        // A key that belongs to another certificate.
        (
            Some(pki.cert_path()),
            Some(other.key_path()),
            vec![
                pki.cert_path().display().to_string(),
                other.key_path().display().to_string(),
            ],
        ),
        (
            Some(pki.cert_path()),
            None,
            vec!["--tls-key".into(), "--tls-cert is set".into()],
        ),
        (
            None,
            Some(pki.key_path()),
            vec!["--tls-cert".into(), "--tls-key is set".into()],
        ),
    ];
    for (cert, key, want) in cases {
        let mut config = Config::for_tests();
        config.tls_cert = cert.clone();
        config.tls_key = key.clone();
        let text = match server::start(config).await {
            Ok(running) => {
                running.shutdown().await;
                panic!("started with cert {cert:?} and key {key:?}");
            }
            Err(e) => e.to_string(),
        };
        for part in &want {
            assert!(text.contains(part.as_str()), "{part:?} not in {text:?}");
        }
        // Never the key material itself.
        assert!(!text.contains("PRIVATE KEY"), "{text}");
    }
}

#[tokio::test]
async fn a_peer_that_never_says_hello_holds_nothing_for_long() {
    let pki = Pki::new();
    let mut config = tls_config(&pki);
    config.max_connections = 2;
    let running = server::start(config).await.expect("starts");
    let addr = running.local_addr();

    // Takes one of the two permits and sends nothing.
    let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The handshake runs in the connection's task: the accept loop goes on at once.
    for _ in 0..3 {
        let answer = tokio::time::timeout(
            HANDSHAKE_TIMEOUT / 2,
            request(
                pki.client_config(&[b"h2"]),
                addr,
                Method::GET,
                "/health",
                None,
            ),
        )
        .await
        .expect("a fresh client is not held up by the silent one")
        .expect("health over TLS");
        assert_eq!(answer.status, StatusCode::OK);
    }
    // And the silent connection is closed at the handshake deadline.
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(
        HANDSHAKE_TIMEOUT + Duration::from_secs(5),
        silent.read(&mut buf),
    )
    .await
    .expect("closed by the handshake deadline");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    running.shutdown().await;
}

fn orchestrator_binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orchestrator"));
    for var in [
        "ORCHESTRATOR_BIND",
        "VALKEY_URL",
        "ORCHESTRATOR_PUBLIC_URL",
        "ORCHESTRATOR_REGISTRATION_KEY",
        "ORCHESTRATOR_TLS_CERT",
        "ORCHESTRATOR_TLS_KEY",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

#[test]
fn the_binary_serves_tls_from_its_environment_and_says_so() {
    let pki = Pki::new();
    let mut child = orchestrator_binary()
        .args(["--bind", "127.0.0.1:0"])
        .env("ORCHESTRATOR_TLS_CERT", pki.cert_path())
        .env("ORCHESTRATOR_TLS_KEY", pki.key_path())
        .spawn()
        .expect("orchestrator starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let starting = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if v["message"] == "orchestrator.starting" {
                    break v;
                }
            }
            Err(e) => {
                let _ = child.kill();
                panic!("no orchestrator.starting line: {e}");
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(starting["tls"], true, "{starting}");
}

#[test]
fn the_binary_refuses_half_a_tls_configuration_and_bad_files() {
    let pki = Pki::new();
    let missing = pki.dir.join("missing.key");
    for (vars, want) in [
        (
            vec![("ORCHESTRATOR_TLS_CERT", pki.cert_path())],
            "--tls-key",
        ),
        (
            vec![
                ("ORCHESTRATOR_TLS_CERT", pki.cert_path()),
                ("ORCHESTRATOR_TLS_KEY", missing.clone()),
            ],
            "missing.key",
        ),
    ] {
        let mut cmd = orchestrator_binary();
        cmd.args(["--bind", "127.0.0.1:0"]);
        for (k, v) in &vars {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("orchestrator runs");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{vars:?}: the orchestrator did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let output = child.wait_with_output().expect("output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!status.success(), "{vars:?}: {text}");
        assert!(text.contains("orchestrator.failed"), "{vars:?}: {text}");
        assert!(text.contains(want), "{want:?} not in {text}");
    }
}
