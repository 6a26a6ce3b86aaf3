//! A real `valkey-server` child process for tests.
//!
//! Each [`ValkeyServer`] runs its own server on a free loopback port with persistence off and
//! its own scratch directory, and kills it when dropped. [`ValkeyServer::stop`] and
//! [`ValkeyServer::start`] take it down and bring it back on the same port, for outage tests;
//! [`ValkeyServer::pause`] and [`ValkeyServer::resume`] freeze and thaw it (`SIGSTOP`,
//! `SIGCONT`), so its connections stay open but nothing answers: a hung server.
//! A missing `valkey-server` binary is a test failure, never a silent skip.
//!
//! A port found free may be taken before the server binds it (valkey-server cannot take an
//! open listener), so a start counts only when the server answering on the port reports our
//! child's process id; a server that lost the race exits and [`ValkeyServer::new`] tries
//! another port.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to answer `PING` after it was started.
const STARTUP_DEADLINE: Duration = Duration::from_secs(20);

/// The binary to run: `$VALKEY_SERVER` if set, else `valkey-server` from `PATH`.
fn binary() -> String {
    std::env::var("VALKEY_SERVER").unwrap_or_else(|_| "valkey-server".to_owned())
}

/// A running (or deliberately stopped) `valkey-server`.
#[derive(Debug)]
pub struct ValkeyServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    paused: bool,
    /// Arguments after the common ones (a cluster node's settings).
    extra: Vec<String>,
}

impl ValkeyServer {
    /// Starts a server on a free port and waits until it answers.
    pub fn new() -> ValkeyServer {
        ValkeyServer::with(Vec::new(), free_port)
    }

    /// Starts a server with `extra` arguments on a port `pick` chose, and waits until it
    /// answers.
    pub fn with(extra: Vec<String>, pick: fn() -> u16) -> ValkeyServer {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "servicekit-valkey-{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        // The port is free when we look; another process could take it before valkey binds
        // (see the module docs), so try a few ports before giving up.
        let mut last_error = String::new();
        for _ in 0..5 {
            let mut server = ValkeyServer {
                port: pick(),
                dir: dir.clone(),
                child: None,
                paused: false,
                extra: extra.clone(),
            };
            match server.try_start() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("valkey-server did not come up: {last_error}");
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's scratch directory (its log, a cluster node's `nodes.conf`).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Freezes the server process (`SIGSTOP`): connections stay open, nothing answers.
    pub fn pause(&mut self) {
        self.signal("STOP");
        self.paused = true;
    }

    /// Thaws a paused server (`SIGCONT`).
    pub fn resume(&mut self) {
        if self.paused {
            self.signal("CONT");
            self.paused = false;
        }
    }

    fn signal(&self, name: &str) {
        let Some(child) = self.child.as_ref() else {
            panic!("valkey-server is not running");
        };
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill -{name}: {e}"));
        assert!(status.success(), "kill -{name} failed: {status}");
    }

    /// Sends one command on a fresh connection of its own and returns the first reply line
    /// (e.g. `+OK`). For commands the store's client should not be involved in.
    pub fn command(&self, args: &[&str]) -> String {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("cannot connect to valkey-server: {e}"));
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream
            .write_all(request.as_bytes())
            .unwrap_or_else(|e| panic!("cannot send {args:?}: {e}"));
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.ends_with(b"\r\n") {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("no reply to {args:?}: {e}"),
            }
        }
        String::from_utf8_lossy(&got).trim_end().to_owned()
    }

    /// Kills the server and waits for it to exit. Its data is gone (persistence is off).
    pub fn stop(&mut self) {
        // A stopped process still dies on SIGKILL, but thaw it so nothing is left frozen.
        if let (true, Some(child)) = (self.paused, self.child.as_ref()) {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
        }
        self.paused = false;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and waits until it answers.
    pub fn start(&mut self) {
        if self.child.is_some() {
            return;
        }
        if let Err(e) = self.try_start() {
            panic!("valkey-server did not come back on port {}: {e}", self.port);
        }
    }

    fn try_start(&mut self) -> Result<(), String> {
        let log = self.dir.join(format!("valkey-{}.log", self.port));
        let child = Command::new(binary())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                panic!("valkey-server not found: run .ci/install-deps (or set VALKEY_SERVER) ({e})")
            }
            Err(e) => panic!("cannot start {}: {e}", binary()),
        };
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    let log = std::fs::read_to_string(&log).unwrap_or_default();
                    return Err(format!("exited with {status}; log:\n{log}"));
                }
            }
            if server_pid(self.port) == Some(pid) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("no PONG within {STARTUP_DEADLINE:?}; log:\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Default for ValkeyServer {
    fn default() -> Self {
        ValkeyServer::new()
    }
}

impl Drop for ValkeyServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("no local address: {e}"))
        .port()
}

/// The process id of the server answering on `port` (from `INFO server`), if one answers.
fn server_pid(port: u16) -> Option<u32> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    let _ = stream.set_read_timeout(Some(Duration::from_millis(1_000)));
    stream.write_all(b"INFO server\r\n").ok()?;
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&got);
        if let Some(rest) = text.split("\r\nprocess_id:").nth(1) {
            if let Some((pid, _)) = rest.split_once("\r\n") {
                return pid.parse().ok();
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}
