//! A small lab of "hosts" on one machine: one network namespace per host, each with its own
//! hostname (a UTS namespace per process) and its own `/etc/hosts` (`/etc/netns/<ns>/hosts`,
//! which `ip netns exec` bind-mounts over `/etc/hosts`), all plugged into a bridge that lives in
//! a dedicated "switch" namespace. Nothing is created in the root namespace: every veth is
//! created inside the switch namespace with its peer moved straight into the host's namespace,
//! so no traffic can leave the namespaces the lab made.
//!
//! The test process itself talks to the hosts from the switch namespace (the bridge has an
//! address there): [`connect_in`] opens a socket on a short-lived thread that has entered the
//! namespace with `setns(2)`; a socket belongs to the namespace it was created in, so it can be
//! used from any thread afterwards.
//!
//! [`Lab`] is the teardown guard: its `Drop` kills every process it started (and anything else
//! left in its namespaces), deletes the namespaces (and with them the bridge and the veths) and
//! the `/etc/netns/<ns>` directories. It runs when an assertion fails too, as the panic unwinds.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::os::raw::c_int;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const CLONE_NEWNET: c_int = 0x4000_0000;
pub const SIGTERM: c_int = 15;
pub const SIGKILL: c_int = 9;

// libc is linked by std on Linux; declaring the two calls avoids a dependency.
extern "C" {
    fn setns(fd: c_int, nstype: c_int) -> c_int;
    fn kill(pid: c_int, sig: c_int) -> c_int;
    fn geteuid() -> u32;
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { geteuid() }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: c_int) -> io::Result<()> {
    let pid = c_int::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: kill has no memory-safety preconditions; pid is a process this lab started.
    if unsafe { kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Runs `ip args…`; panics with its output when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip`: {e} (is iproute2 installed?)"));
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `ip args…` and ignores the outcome (teardown).
fn ip_quiet(args: &[&str]) -> Option<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Kills every process still in namespace `ns` (whatever a test left behind in it).
fn kill_all_in(ns: &str) {
    if let Some(pids) = ip_quiet(&["netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let _ = signal(pid, SIGKILL);
        }
    }
}

/// Opens a TCP connection to `addr` from inside network namespace `ns`.
pub fn connect_in(ns: &str, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            let file = File::open(&path)?;
            // SAFETY: a valid open namespace file descriptor; setns changes only the
            // namespace of this thread, which ends right after connecting.
            if unsafe { setns(file.as_raw_fd(), CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            TcpStream::connect_timeout(&addr, timeout)
        })
        .expect("spawn a thread")
        .join()
        .expect("the netns thread panicked")
}

/// One `GET` over HTTP/1.1 (`Connection: close`) from namespace `ns`: the status and body.
pub fn http_get(
    ns: &str,
    addr: SocketAddrV4,
    host: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    let deadline = Instant::now() + timeout;
    let mut stream = connect_in(ns, addr.into(), timeout).map_err(|e| format!("connect: {e}"))?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(10));
    stream
        .set_read_timeout(Some(left))
        .and_then(|()| stream.set_write_timeout(Some(left)))
        .map_err(|e| format!("socket: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("receive: {e}"))?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no complete head in {} bytes", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        if body.len() < n {
            return Err(format!("body cut short: {} of {n} bytes", body.len()));
        }
        body[..n].to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line cut short")?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("chunk cut short".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// A host of the lab.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its hostname, also its name in every host's `/etc/hosts`.
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    pub addr: Ipv4Addr,
}

/// A process the lab started.
struct Proc {
    label: String,
    child: Child,
    log: PathBuf,
}

/// A handle to a process started by [`Lab::spawn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId(usize);

/// The topology and everything started in it; dropping it tears it all down.
pub struct Lab {
    /// `sk-<pid>`: the prefix of every namespace name.
    pub prefix: String,
    /// The switch namespace: the bridge, and the test's own client address.
    pub switch_ns: String,
    /// The test's address on the bridge.
    pub client_addr: Ipv4Addr,
    hosts: Vec<Host>,
    namespaces: Vec<String>,
    etc_dirs: Vec<PathBuf>,
    created_etc_netns: bool,
    procs: Vec<Proc>,
    log_dir: PathBuf,
}

impl Lab {
    /// An empty lab: the switch namespace with its bridge, on 10.231.`subnet`.0/24.
    pub fn new(log_dir: PathBuf, subnet: u8) -> Lab {
        let prefix = format!("sk-{}", std::process::id());
        remove_stale_labs();
        let _ = fs::remove_dir_all(&log_dir);
        fs::create_dir_all(&log_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_dir.display()));
        let switch_ns = format!("{prefix}-switch");
        let mut lab = Lab {
            switch_ns: switch_ns.clone(),
            client_addr: Ipv4Addr::new(10, 231, subnet, 1),
            prefix,
            hosts: Vec::new(),
            namespaces: Vec::new(),
            etc_dirs: Vec::new(),
            created_etc_netns: !Path::new("/etc/netns").exists(),
            procs: Vec::new(),
            log_dir,
        };
        lab.add_ns(&switch_ns);
        ip(&["-n", &switch_ns, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &switch_ns,
            "addr",
            "add",
            &format!("{}/24", lab.client_addr),
            "dev",
            "br0",
        ]);
        ip(&["-n", &switch_ns, "link", "set", "br0", "up"]);
        lab
    }

    fn add_ns(&mut self, ns: &str) {
        ip(&["netns", "add", ns]);
        self.namespaces.push(ns.to_owned());
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }

    /// Adds host `name` at `addr`: a namespace, a veth pair into the bridge, `lo` up.
    pub fn add_host(&mut self, name: &str, addr: Ipv4Addr) -> Host {
        let ns = format!("{}-{name}", self.prefix);
        self.add_ns(&ns);
        let port = format!("p-{name}");
        let sw = self.switch_ns.clone();
        ip(&[
            "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["-n", &sw, "link", "set", &port, "master", "br0"]);
        ip(&["-n", &sw, "link", "set", &port, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        let host = Host {
            name: name.to_owned(),
            ns,
            addr,
        };
        self.hosts.push(host.clone());
        host
    }

    /// Writes `/etc/netns/<ns>/hosts` for every host: all hosts' names and addresses.
    pub fn write_hosts_files(&mut self) {
        let mut text = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n");
        for h in &self.hosts {
            text.push_str(&format!("{}\t{}\n", h.addr, h.name));
        }
        for h in self.hosts.clone() {
            let dir = PathBuf::from("/etc/netns").join(&h.ns);
            fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
            self.etc_dirs.push(dir.clone());
            fs::write(dir.join("hosts"), &text)
                .unwrap_or_else(|e| panic!("cannot write {}/hosts: {e}", dir.display()));
        }
    }

    /// Starts `program args…` on `host`, under its hostname, with `env` set; stdout and stderr
    /// go to a log file. Returns once the process is `program` itself (the wrappers `ip netns
    /// exec`, `unshare` and `sh` all exec), so signals reach it.
    pub fn spawn(
        &mut self,
        label: &str,
        host: &Host,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        env_remove: &[&str],
    ) -> ProcId {
        let log = self
            .log_dir
            .join(format!("{:02}-{label}.log", self.procs.len()));
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &host.ns, "unshare", "--uts", "sh", "-c"])
            .arg(r#"hostname "$1" && shift && exec "$@""#)
            .arg("sh")
            .arg(&host.name)
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for var in env_remove {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label} ({}): {e}", program.display()));
        let pid = child.id();
        self.procs.push(Proc {
            label: label.to_owned(),
            child,
            log,
        });
        let id = ProcId(self.procs.len() - 1);
        // Wait for the exec chain to end in `program`.
        // (valkey-server is a symlink to valkey-check-rdb: compare resolved paths.)
        let want = fs::canonicalize(program).unwrap_or_else(|_| program.to_path_buf());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
            if exe.as_deref() == Some(want.as_path()) {
                break;
            }
            if let Some(status) = self.try_wait(id) {
                panic!(
                    "{label} exited at once with {status}:\n{}",
                    self.log_text(id)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{label} (pid {pid}) did not become {} within 10 s (now {exe:?})",
                program.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        id
    }

    pub fn signal(&self, id: ProcId, sig: c_int) {
        let p = &self.procs[id.0];
        signal(p.child.id(), sig)
            .unwrap_or_else(|e| panic!("cannot signal {} ({}): {e}", p.label, p.child.id()));
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self, id: ProcId) -> Option<ExitStatus> {
        self.procs[id.0].child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit within `within`; panics otherwise.
    pub fn wait_exit(&mut self, id: ProcId, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_wait(id) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {within:?}",
                self.procs[id.0].label
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What the process logged so far.
    pub fn log_text(&self, id: ProcId) -> String {
        fs::read_to_string(&self.procs[id.0].log).unwrap_or_default()
    }

    /// Sets the host's own end of its link (`eth0`, in its namespace) down or up.
    pub fn set_link(&self, host: &Host, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &host.ns, "link", "set", "eth0", state]);
    }
}

/// Removes what an earlier run killed before its teardown left behind: namespaces named
/// `sk-<pid>-…` (and their `/etc/netns` directories) whose process no longer exists.
fn remove_stale_labs() {
    let Some(list) = ip_quiet(&["netns", "list"]) else {
        return;
    };
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = ns.strip_prefix("sk-") else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        if pid.is_empty()
            || !pid.bytes().all(|b| b.is_ascii_digit())
            || Path::new(&format!("/proc/{pid}")).exists()
        {
            continue;
        }
        kill_all_in(ns);
        let _ = ip_quiet(&["netns", "del", ns]);
        let _ = fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        for p in &mut self.procs {
            if let Ok(None) = p.child.try_wait() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
        if failed {
            for p in &self.procs {
                let text = fs::read_to_string(&p.log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(30)..];
                eprintln!(
                    "---- last {} lines of {} ({}) ----\n{}",
                    tail.len(),
                    p.label,
                    p.log.display(),
                    tail.join("\n")
                );
            }
        }
        for ns in self.namespaces.iter().rev() {
            kill_all_in(ns);
            let _ = ip_quiet(&["netns", "del", ns]);
        }
        for dir in &self.etc_dirs {
            let _ = fs::remove_dir_all(dir);
        }
        if self.created_etc_netns {
            let _ = fs::remove_dir("/etc/netns"); // only when empty: other runs may use it
        }
        if failed || std::env::var_os("MULTIHOST_KEEP_LOGS").is_some() {
            eprintln!("multihost: logs kept in {}", self.log_dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.log_dir);
        }
    }
}
