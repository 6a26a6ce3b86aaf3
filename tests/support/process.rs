//! The examples as real processes: built by `scripts/test` (`cargo build --examples`) before
//! the tests run, started with a clean environment, stopped with real signals.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The build's profile directory: target/<profile>/deps/<this test> → target/<profile>.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .expect("target directory")
}

/// The orchestrator binary, built by `scripts/test` (`cargo build --bins`).
pub fn orchestrator_binary() -> PathBuf {
    let path = profile_dir().join("orchestrator");
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`, as scripts/test does)",
        path.display()
    );
    path
}

/// A server process started from `cmd` and listening on `addr`; killed when dropped.
pub struct Listening(Child);

impl Listening {
    /// Starts `cmd` and waits (20 s at most) until `addr` takes connections; `log` is where
    /// a failure message sends the reader.
    pub fn start(mut cmd: Command, addr: &str, log: &str) -> Listening {
        let mut server = Listening(cmd.spawn().expect("server starts"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Some(status) = server.0.try_wait().expect("wait") {
                panic!("the server exited ({status}): {log}");
            }
            assert!(
                Instant::now() < deadline,
                "the server did not listen on {addr}: {log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// SIGTERM, as a deployment stops it, and its exit awaited (killed after `within`).
    pub fn stop(mut self, within: Duration) -> ExitStatus {
        sigterm(&self.0);
        wait_exit(&mut self.0, within)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A command for the example `name`, with every servicekit variable of the test's own
/// environment removed and its output piped.
pub fn example(name: &str) -> Command {
    let path = profile_dir().join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: build the examples first (`cargo build --examples --features \
         servicekit/tls,servicekit/discovery`, as scripts/test does)",
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
        "SERVICE_DISPLAY_NAME",
        "SERVICE_HEALTH",
        "SERVICE_HEALTH_OUTPUT",
        "SERVICE_REPORT_HEALTH",
        "SERVICE_ADMIN",
        "SERVICEKIT_CHECK_HTTP",
        "SERVICEKIT_CHECK_TCP",
        "SERVICEKIT_CHECK_GRPC",
        "SERVICEKIT_CHECK_INTERVAL_SECONDS",
        "SERVICEKIT_CHECK_TIMEOUT_SECONDS",
        "SERVICEKIT_CHECK_DEREGISTER_CRITICAL_AFTER_SECONDS",
        "CONSUMER_TARGET",
        "CONSUMER_RATE",
        "CONSUMER_PATH",
        "RUST_LOG",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for the child to exit within `within`, killing it otherwise.
pub fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the child and returns what it printed, for a failure message.
pub fn output_of(mut child: Child) -> String {
    let _ = child.kill();
    match child.wait_with_output() {
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("(no output: {e})"),
    }
}

/// Sends SIGTERM to the child.
pub fn sigterm(child: &Child) {
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success(), "kill -TERM {}", child.id());
}

/// A running example whose output (stdout and stderr, interleaved by line) is collected as
/// it comes, so a test can wait for a log line and a failure can show everything. Killed
/// when dropped.
pub struct Process {
    /// `None` once [`Process::terminate`] took it to wait for its exit.
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `cmd`, collecting its output.
    pub fn spawn(mut cmd: Command) -> Process {
        let mut child = cmd.spawn().expect("example starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let readers: Vec<Box<dyn Read + Send>> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        for reader in readers {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { return };
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
        Process {
            child: Some(child),
            lines,
        }
    }

    /// Everything printed so far.
    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether some line printed so far satisfies `pred`.
    pub fn printed(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|l| pred(l))
    }

    /// SIGTERM, then waits for the exit (killing it after `within`).
    pub async fn terminate(mut self, within: Duration) -> (ExitStatus, Vec<String>) {
        let mut child = self.child.take().expect("a running process");
        sigterm(&child);
        let status = tokio::task::spawn_blocking(move || wait_exit(&mut child, within))
            .await
            .expect("waiter");
        // The reader threads finish once the pipes close; give them a moment to drain.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && Arc::strong_count(&self.lines) > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (status, self.output())
    }

    /// SIGKILL, at once.
    pub fn kill(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `consumer` example calling the instances of `target` at `rate` requests per second,
/// logging each answer (`consumer=debug`).
pub fn consumer(base: &str, target: &str, rate: u32) -> Process {
    let mut cmd = example("consumer");
    cmd.env("SERVICEKIT_ORCHESTRATOR_URL", base)
        .env("CONSUMER_TARGET", target)
        .env("CONSUMER_RATE", rate.to_string())
        .env("RUST_LOG", "info,consumer=debug");
    Process::spawn(cmd)
}

/// The value of `field=` in a log line.
pub fn field<'a>(line: &'a str, field: &str) -> Option<&'a str> {
    let start = line.find(&format!("{field}="))? + field.len() + 1;
    let rest = &line[start..];
    let end = rest.find([' ', ',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

/// Stops the consumer and returns `(requests, failed)` from its summary line, and everything it
/// printed.
pub async fn consumer_summary(consumer: Process) -> (u64, u64, Vec<String>) {
    let (status, lines) = consumer.terminate(Duration::from_secs(20)).await;
    assert!(
        status.success(),
        "the consumer exits 0: {status:?}\n{}",
        lines.join("\n")
    );
    let line = lines
        .iter()
        .rev()
        .find(|l| l.contains("consumer.summary"))
        .unwrap_or_else(|| panic!("no consumer.summary line:\n{}", lines.join("\n")));
    let number = |name| {
        field(line, name)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
    };
    (number("requests"), number("failed"), lines)
}
