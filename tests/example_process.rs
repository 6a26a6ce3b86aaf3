//! The `service` example as a real process: `fail_on_error` makes it exit non-zero, and
//! SIGTERM deregisters it and exits 0. The example binary is built by `scripts/test`
//! (`cargo build --examples`) before the tests run.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::process::{example, output_of, wait_exit};
use support::*;

#[test]
fn fail_on_error_makes_the_service_exit_non_zero() {
    let dead = format!("http://127.0.0.1:{}/services/$register", free_port());
    let mut child = example("service")
        .env("SERVICEKIT_ORCHESTRATOR_URL", dead)
        .env("SERVICEKIT_HOST", "127.0.0.1")
        .env("SERVICEKIT_PORT", free_port().to_string())
        .env("SERVICEKIT_FAIL_ON_ERROR", "true")
        .env("SERVICEKIT_MAX_RETRIES", "2")
        .env("SERVICEKIT_RETRY_DELAY_MS", "50")
        .spawn()
        .expect("example starts");
    let status = wait_exit(&mut child, Duration::from_secs(30));
    let output = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!status.success(), "exited with {status:?}: {text}");
    assert!(text.contains("registration.failed"), "{text}");
    assert!(text.contains("after 2 attempt"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deregisters_and_exits_zero() {
    let (orch, api) = orchestrator(30, None).await;
    let port = free_port();
    // Only the orchestrator's base URL, as the README's command gives it.
    let mut child = example("service")
        .env("SERVICEKIT_ORCHESTRATOR_URL", orch.base_url())
        .env("SERVICEKIT_HOST", "127.0.0.1")
        .env("SERVICEKIT_PORT", port.to_string())
        .env("SERVICE_DISPLAY_NAME", "svc under test")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("example starts");
    let url = format!("http://127.0.0.1:{port}");
    let entry = registered(&api, &url, Duration::from_secs(30)).await;
    assert_eq!(entry["info"]["display_name"], "svc under test");
    let info: serde_json::Value = http::Api::new(url.clone()).get("/api/v1/info").await.json();
    assert_eq!(info["display_name"], "svc under test");

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(20)))
            .await
            .expect("waiter");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        entries_for(&api, &url).await.is_empty(),
        "deregistered on SIGTERM"
    );
    orch.shutdown().await;
}

/// An orchestrator serving TLS with a certificate from `pki`.
async fn tls_orchestrator(pki: &tls::Pki) -> servicekit_orchestrator::server::Running {
    let mut config = servicekit_orchestrator::config::Config::for_tests();
    config.tls_cert = Some(pki.cert_path());
    config.tls_key = Some(pki.key_path());
    servicekit_orchestrator::server::start(config)
        .await
        .expect("TLS orchestrator starts")
}

/// The entries registered for `url`, listed over TLS.
async fn entries_over_tls(
    pki: &tls::Pki,
    orch: &servicekit_orchestrator::server::Running,
    url: &str,
) -> Vec<serde_json::Value> {
    let answer = tls::request(
        pki.client_config(&[b"h2"]),
        orch.local_addr(),
        ::http::Method::GET,
        &format!("/services?url={url}"),
        None,
    )
    .await
    .expect("list over TLS");
    assert_eq!(answer.status, 200, "{answer:?}");
    answer.body["services"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_over_https_trusting_ssl_cert_file_and_deregisters_on_sigterm() {
    let pki = tls::Pki::new();
    let orch = tls_orchestrator(&pki).await;
    assert!(
        orch.base_url().starts_with("https://"),
        "{}",
        orch.base_url()
    );
    let port = free_port();
    let mut child = example("service")
        .env("SERVICEKIT_ORCHESTRATOR_URL", orch.base_url())
        .env("SSL_CERT_FILE", pki.ca_path())
        .env("SERVICEKIT_HOST", "127.0.0.1")
        .env("SERVICEKIT_PORT", port.to_string())
        .env("SERVICE_DISPLAY_NAME", "svc over tls")
        .spawn()
        .expect("example starts");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let entry = loop {
        if let Some(entry) = entries_over_tls(&pki, &orch, &url).await.pop() {
            break entry;
        }
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            panic!(
                "the service never registered over https (an example built without servicekit's \
                 `tls` feature says so below; build with --features servicekit/tls):\n{}",
                output_of(child)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(entry["info"]["display_name"], "svc over tls");

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let (status, child) = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut child, Duration::from_secs(20));
        (status, child)
    })
    .await
    .expect("waiter");
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        output_of(child)
    );
    assert!(
        entries_over_tls(&pki, &orch, &url).await.is_empty(),
        "deregistered over https on SIGTERM"
    );
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_orchestrator_certificate_is_a_readable_error() {
    let pki = tls::Pki::new();
    let stranger = tls::Pki::new();
    let orch = tls_orchestrator(&pki).await;
    let mut child = example("service")
        .env("SERVICEKIT_ORCHESTRATOR_URL", orch.base_url())
        // Trusts a CA, just not the one that signed the orchestrator's certificate.
        .env("SSL_CERT_FILE", stranger.ca_path())
        .env("SERVICEKIT_HOST", "127.0.0.1")
        .env("SERVICEKIT_PORT", free_port().to_string())
        .env("SERVICEKIT_FAIL_ON_ERROR", "true")
        .env("SERVICEKIT_MAX_RETRIES", "2")
        .env("SERVICEKIT_RETRY_DELAY_MS", "50")
        .spawn()
        .expect("example starts");
    let (status, child) = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut child, Duration::from_secs(30));
        (status, child)
    })
    .await
    .expect("waiter");
    let text = output_of(child);
    assert!(!status.success(), "exited with {status:?}: {text}");
    assert!(text.contains("registration.failed"), "{text}");
    assert!(
        text.contains("invalid peer certificate: UnknownIssuer"),
        "the reason is in the log: {text}"
    );
    orch.shutdown().await;
}
