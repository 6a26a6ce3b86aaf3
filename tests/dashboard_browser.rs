//! The dashboard in a real headless Chromium (issue 12): `tests/browser/dashboard.mjs` drives
//! Debian's `/usr/bin/chromium` through playwright-core against the real orchestrator binary,
//! and this test owns the processes: it starts the orchestrator, stops it and starts it again
//! on the same port when the script asks (`@stop` / `@start`, answered `ok`), and kills the
//! orchestrator, node and the browser whatever happens. Screenshots go to
//! `target/dashboard-screenshots/`. The README's screenshot script (`tests/browser/
//! screenshot.mjs`) runs here too, so its command stays true.

mod support;

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::free_port;
use support::process::{orchestrator_binary, profile_dir, wait_exit, Listening};

/// The whole run, browser included: a hang fails the test instead of stalling CI.
const BOUND: Duration = Duration::from_secs(120);
/// Short, so an unpinged registration expires while the page watches.
const TTL_SECONDS: u64 = 3;
const CHROMIUM: &str = "/usr/bin/chromium";
const HOW_TO_FIX: &str = "run scripts/test, which installs node, npm and Debian's chromium \
    (.ci/install-deps) and the browser test's packages (`npm ci` in tests/browser)";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// Node, Chromium and playwright-core are there, or the test says how to get them.
fn require_tools() {
    let node = Command::new("node").arg("--version").output();
    match node {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("`node --version` failed ({}): {HOW_TO_FIX}", out.status),
        Err(e) => panic!("node is missing ({e}): {HOW_TO_FIX}"),
    }
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: {HOW_TO_FIX}"
    );
    let playwright = browser_dir().join("node_modules/playwright-core");
    assert!(
        playwright.join("package.json").exists(),
        "{} is missing: {HOW_TO_FIX}",
        playwright.display()
    );
}

/// The orchestrator binary on `addr`, its output appended to `log`.
fn start_orchestrator(addr: &str, log: &Path) -> Listening {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("orchestrator log");
    let err = out.try_clone().expect("orchestrator log");
    let mut cmd = Command::new(orchestrator_binary());
    cmd.args(["--bind", addr, "--ttl-seconds", &TTL_SECONDS.to_string()])
        .env("LOG_FORMAT", "pretty")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    for var in [
        "VALKEY_URL",
        "ORCHESTRATOR_REGISTRATION_KEY",
        "ORCHESTRATOR_ADMIN_KEY",
        "ORCHESTRATOR_REQUIRE_LEASE",
        "ORCHESTRATOR_PUBLIC_URL",
        "ORCHESTRATOR_TLS_CERT",
        "ORCHESTRATOR_TLS_KEY",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    Listening::start(cmd, addr, &format!("see {}", log.display()))
}

/// `kill -KILL -- -<group>`: every process of the group.
fn kill_group(group: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .stderr(Stdio::null())
        .status();
}

/// The node script in its own process group, and the browser it launched (playwright starts
/// Chromium in a group of its own): unless the script finished, both groups are killed when
/// dropped, so a failed or hung run leaves nothing behind. Its TMPDIR (Chromium's profile) is
/// removed too.
struct Script {
    child: Child,
    stdin: ChildStdin,
    browser_group: Option<u32>,
    finished: bool,
    tmp: PathBuf,
}

impl Drop for Script {
    fn drop(&mut self) {
        if !self.finished {
            kill_group(self.child.id());
            if let Some(group) = self.browser_group {
                kill_group(group);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// Forwards each line of `from` to `to`, prefixed with the stream's name.
fn forward(from: impl Read + Send + 'static, name: &'static str, to: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if to.send(format!("{name}{line}")).is_err() {
                break;
            }
        }
    });
}

/// A fresh, empty `target/<name>` for Chromium's profile (the script's TMPDIR).
fn fresh_dir(name: &str) -> PathBuf {
    let dir = target_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("browser tmp dir");
    dir
}

/// target/debug → target.
fn target_dir() -> PathBuf {
    profile_dir()
        .parent()
        .map(Path::to_path_buf)
        .expect("target")
}

impl Script {
    /// Runs `node <script> <args>` in tests/browser with `env`, `tmp` as its TMPDIR, until its
    /// output ends or `bound` passes (a panic). Each line goes to `answer`, whose reply (if
    /// any) is written to the script's stdin; `@browser-pid N` is noted for the clean-up.
    /// Returns the exit status and the output; the caller says whether it `finished`.
    fn run(
        script: &str,
        args: &[&OsStr],
        env: &[(&str, &OsStr)],
        tmp: PathBuf,
        bound: Duration,
        mut answer: impl FnMut(&str) -> Option<&'static str>,
    ) -> (Script, ExitStatus, Vec<String>) {
        let started = Instant::now();
        let mut child = Command::new("node")
            .arg(script)
            .args(args)
            .current_dir(browser_dir())
            .envs(env.iter().copied())
            .env("CHROMIUM", CHROMIUM)
            .env("TMPDIR", &tmp)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("node starts");
        let (tx, lines) = mpsc::channel();
        forward(child.stdout.take().expect("stdout"), "", tx.clone());
        forward(child.stderr.take().expect("stderr"), "node stderr: ", tx);
        let stdin = child.stdin.take().expect("stdin");
        let mut run = Script {
            child,
            stdin,
            browser_group: None,
            finished: false,
            tmp,
        };
        let deadline = started + bound;
        let mut output = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "{script} did not finish within {bound:?}; its output:\n{}",
                    output.join("\n")
                ),
            };
            println!("{line}");
            if let Some(pid) = line.strip_prefix("@browser-pid ") {
                run.browser_group = pid.trim().parse().ok();
            } else if let Some(reply) = answer(&line) {
                writeln!(run.stdin, "{reply}").expect("answer the script");
            }
            output.push(line);
        }
        // Its output ended: node is exiting.
        let left = deadline.saturating_duration_since(Instant::now());
        let status = wait_exit(&mut run.child, left);
        (run, status, output)
    }
}

#[test]
fn the_dashboard_works_in_a_real_browser() {
    require_tools();
    let screenshots = target_dir().join("dashboard-screenshots");
    let orchestrator_log = target_dir().join("dashboard-browser-orchestrator.log");
    let _ = std::fs::remove_file(&orchestrator_log);

    let addr = format!("127.0.0.1:{}", free_port());
    let mut orchestrator = Some(start_orchestrator(&addr, &orchestrator_log));
    let started = Instant::now();
    let base = format!("http://{addr}");
    let ttl = TTL_SECONDS.to_string();
    let mut done = false;
    let (mut script, status, output) = Script::run(
        "dashboard.mjs",
        &[],
        &[
            ("ORCHESTRATOR_URL", base.as_ref()),
            ("SCREENSHOT_DIR", screenshots.as_ref()),
            ("TTL_SECONDS", ttl.as_ref()),
        ],
        fresh_dir("dashboard-browser-tmp"),
        BOUND,
        |line| match line {
            "@stop" => {
                if let Some(o) = orchestrator.take() {
                    o.stop(Duration::from_secs(10));
                }
                Some("ok")
            }
            "@start" => {
                orchestrator = Some(start_orchestrator(&addr, &orchestrator_log));
                Some("ok")
            }
            _ => {
                done |= line == "@done";
                None
            }
        },
    );
    script.finished = status.success() && done;
    assert!(
        script.finished,
        "the browser test failed ({status}); the orchestrator's log is {}; its output:\n{}",
        orchestrator_log.display(),
        output.join("\n")
    );
    println!(
        "browser test passed in {:.1} s; screenshots in {}",
        started.elapsed().as_secs_f64(),
        screenshots.display()
    );
}

#[test]
fn the_readme_screenshot_script_takes_a_picture() {
    require_tools();
    let out = target_dir()
        .join("dashboard-screenshots")
        .join("readme.png");
    std::fs::create_dir_all(out.parent().expect("folder")).expect("screenshot folder");
    let _ = std::fs::remove_file(&out);
    let log = target_dir().join("dashboard-screenshot-orchestrator.log");
    let addr = format!("127.0.0.1:{}", free_port());
    let _orchestrator = start_orchestrator(&addr, &log);

    let base = format!("http://{addr}");
    let (mut script, status, output) = Script::run(
        "screenshot.mjs",
        &[base.as_ref(), out.as_ref()],
        &[],
        fresh_dir("dashboard-screenshot-tmp"),
        Duration::from_secs(60),
        |_| None,
    );
    script.finished = status.success();
    assert!(
        script.finished,
        "screenshot.mjs failed ({status}): {}",
        output.join("\n")
    );
    let png = std::fs::read(&out).expect("the screenshot exists");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} is not a picture of a page ({} bytes)",
        out.display(),
        png.len()
    );
}
