//! The README's first command, `cargo run -p servicekit-orchestrator --example demo`, run as
//! the built example binary (`orchestrator/examples/demo.rs`; every workspace member's
//! examples land in `target/<profile>/examples/`): both services register, the registry is
//! printed, the consumer's first call is answered by Service A, Ctrl-C (sent while the consumer
//! is still starting) stops the consumer with no failed call, deregisters the services and
//! exits 0.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use serde_json::Value;

#[test]
fn demo_registers_two_services_and_cleans_up_on_ctrl_c() {
    let exe = std::env::current_exe().expect("test path");
    let demo = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples").join("demo"))
        .expect("target dir");
    assert!(
        demo.exists(),
        "{} is missing: build the examples first (`cargo build --workspace --examples`, as scripts/test does)",
        demo.display()
    );
    let mut child = Command::new(demo)
        .env("DEMO_ORCHESTRATOR_BIND", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("demo starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_with = |prefix: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line[prefix.len()..].to_owned(),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("the demo printed no line starting with {prefix:?} within 60 s")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the demo's output ended (it exited) before a line starting with {prefix:?}")
                }
            }
        }
    };

    let registry: Value = serde_json::from_str(&next_with("registry: ")).expect("registry JSON");
    assert_eq!(registry["count"], 2, "{registry}");
    let mut names: Vec<&str> = registry["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| s["info"]["display_name"].as_str().unwrap_or(""))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["Service A", "Service B"]);
    // Ctrl-C at once, while the consumer is still starting: a Ctrl-C at any time after the
    // demo started stops it cleanly (once it has started), never half-way.
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let answer = next_with("consumer: Service A answered ");
    assert!(
        answer.starts_with("200 OK from http://127.0.0.1:"),
        "{answer}"
    );
    assert!(
        answer.contains("\"display_name\":\"Service A\""),
        "{answer}"
    );
    let summary = next_with("consumer: requests=");
    assert!(
        summary.ends_with(" failed=0"),
        "the consumer's calls all succeeded: {summary}"
    );
    let after: Value =
        serde_json::from_str(&next_with("registry after shutdown: ")).expect("registry JSON");
    assert_eq!(after["count"], 0, "both services deregistered: {after}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the demo did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}
