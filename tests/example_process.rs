//! The `service` example as a real process: `fail_on_error` makes it exit non-zero, and
//! SIGTERM deregisters it and exits 0. The example binary is built by `scripts/test`
//! (`cargo build --examples`) before the tests run.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn example(name: &str) -> Command {
    // target/<profile>/deps/<this test> → target/<profile>/examples/<name>
    let exe = std::env::current_exe().expect("test binary path");
    let path: PathBuf = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples").join(name))
        .expect("target directory");
    assert!(
        path.exists(),
        "{} is missing: build the examples first (`cargo build --examples`, as scripts/test does)",
        path.display()
    );
    let mut cmd = Command::new(path);
    for var in [
        "SERVICEKIT_ORCHESTRATOR_URL",
        "SERVICEKIT_HOST",
        "SERVICEKIT_PORT",
        "SERVICEKIT_REGISTRATION_KEY",
        "SERVICEKIT_FAIL_ON_ERROR",
        "SERVICEKIT_MAX_RETRIES",
        "SERVICEKIT_RETRY_DELAY_MS",
        "SERVICEKIT_DISPLAY_NAME",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for the child to exit within `within`, killing it otherwise.
fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the example did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

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
