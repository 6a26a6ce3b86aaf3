//! The README cannot rot: every shell command in it is either run here, against the real
//! binaries, or named with the test (or CI step) that runs it.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::process::{example, orchestrator_binary, Listening, Process};
use support::*;

/// Commands run elsewhere, with where.
const RUN_ELSEWHERE: &[(&str, &str)] = &[
    (
        "cargo run -p servicekit-orchestrator --example demo",
        "tests/demo.rs runs the demo binary and checks its output",
    ),
    ("scripts/test", ".ci/run runs it"),
    (
        "cargo test -p servicekit-tests --test dashboard_browser",
        "scripts/test runs it with every other test",
    ),
    (
        "VALKEY_URL=redis-cluster://10.0.0.1:6379,10.0.0.2:6379,10.0.0.3:6379 orchestrator",
        "orchestrator/tests/binary.rs runs the binary with three seeds of a real local cluster",
    ),
    (
        "SERVICEKIT_ORCHESTRATOR_URL=http://localhost:9000 SERVICEKIT_HOST=localhost cargo run --example service",
        "tests/example_process.rs runs the service example with only the base URL",
    ),
    (
        "SERVICE_DISPLAY_NAME=svca SERVICEKIT_ORCHESTRATOR_URL=http://localhost:9000 SERVICEKIT_HOST=127.0.0.1 SERVICEKIT_PORT=8001 cargo run --example service &",
        "tests/discovery.rs runs service processes named svca the same way (on free ports)",
    ),
    (
        "SERVICEKIT_ORCHESTRATOR_URL=http://localhost:9000 CONSUMER_TARGET=svca cargo run --example consumer --features discovery",
        "tests/discovery.rs runs the consumer example against real service processes (the rolling restart)",
    ),
];

/// The commands of every ```sh block, continuation lines joined.
fn readme_commands() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let mut commands = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_sh = line.trim() == "```sh";
            continue;
        }
        if !in_sh || line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => pending.push_str(head),
            None => {
                pending.push_str(line);
                commands.push(std::mem::take(&mut pending).trim().to_owned());
            }
        }
    }
    commands
}

/// `cargo run -p servicekit-orchestrator` without cargo: the built binary, on `bind`.
fn start_orchestrator(bind: &str, valkey_url: Option<&str>) -> Listening {
    let mut cmd = Command::new(orchestrator_binary());
    cmd.env("ORCHESTRATOR_BIND", bind)
        .env_remove("VALKEY_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(url) = valkey_url {
        cmd.env("VALKEY_URL", url);
    }
    Listening::start(cmd, bind, "its output is not kept")
}

/// Runs a README command with the README's address replaced by the test's.
fn sh(command: &str, addr: &str) -> String {
    let command = command.replace("localhost:9000", addr);
    let out = Command::new("bash")
        .args(["-c", &command])
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_readme_command_is_run_somewhere() {
    let commands = readme_commands();
    assert!(commands.len() >= 6, "found {commands:?}");
    for command in &commands {
        let here = command.starts_with("curl ")
            || command.starts_with(HEALTH_SERVICE)
            || command == "cargo run -p servicekit-orchestrator &"
            || command == "VALKEY_URL=redis://127.0.0.1:6379 cargo run -p servicekit-orchestrator";
        let elsewhere = RUN_ELSEWHERE.iter().any(|(c, _)| c == command);
        assert!(
            here || elsewhere,
            "README command {command:?} is not run by any test: run it in tests/readme.rs or list it in RUN_ELSEWHERE"
        );
    }
}

#[test]
fn the_try_it_commands_work() {
    let addr = format!("127.0.0.1:{}", free_port());
    let _orch = start_orchestrator(&addr, None);
    let curls: Vec<String> = readme_commands()
        .into_iter()
        .filter(|c| c.starts_with("curl ") && !c.contains("health"))
        .collect();
    assert_eq!(curls.len(), 2, "{curls:?}");
    let registered: Value = serde_json::from_str(&sh(&curls[0], &addr)).expect("register JSON");
    assert_eq!(registered["status"], "registered");
    assert_eq!(registered["service_url"], "http://svca:8000");
    let listed: Value = serde_json::from_str(&sh(&curls[1], &addr)).expect("list JSON");
    assert_eq!(listed["count"], 1);
    assert_eq!(listed["services"][0]["id"], registered["id"]);
}

/// How the README's health demo starts its service.
const HEALTH_SERVICE: &str = "SERVICE_ADMIN=true ";

/// Polls `curl` (a README command) until its JSON satisfies `ok`, for up to 20 s.
fn until_json(command: &str, addr: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v: Value = serde_json::from_str(&sh(command, addr)).unwrap_or(Value::Null);
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: still {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_health_commands_work() {
    let addr = format!("127.0.0.1:{}", free_port());
    let _orch = start_orchestrator(&addr, None);
    let commands = readme_commands();
    let service = commands
        .iter()
        .find(|c| c.starts_with(HEALTH_SERVICE))
        .expect("the README's health demo service");
    // Its variables, as the README sets them; then its address and the test's orchestrator.
    let mut cmd = example("service");
    let port = free_port();
    for (k, v) in service
        .split_whitespace()
        .map_while(|word| word.split_once('='))
    {
        cmd.env(k, v);
    }
    cmd.env("SERVICEKIT_ORCHESTRATOR_URL", format!("http://{addr}"))
        .env("SERVICEKIT_PORT", port.to_string());
    let _service = Process::spawn(cmd);
    let [switch, list] = ["/admin/health", "health=critical"].map(|part| {
        commands
            .iter()
            .find(|c| c.starts_with("curl ") && c.contains(part))
            .unwrap_or_else(|| panic!("the README's curl with {part}"))
            .replace("127.0.0.1:8001", &format!("127.0.0.1:{port}"))
    });
    until_json(
        "curl -s localhost:9000/services",
        &addr,
        "registered",
        |v| v["count"] == 1,
    );
    let critical = until_json(&list, &addr, "nothing critical yet", |v| v["count"] == 0);
    assert_eq!(critical["services"], serde_json::json!([]));
    sh(&switch, &addr);
    let critical = until_json(&list, &addr, "the switch made it critical", |v| {
        v["count"] == 1
    });
    assert_eq!(critical["services"][0]["health"]["output"], "db down");
}

#[test]
fn the_valkey_command_uses_valkey() {
    let valkey = valkey::ValkeyServer::new();
    let command = readme_commands()
        .into_iter()
        .find(|c| c.starts_with("VALKEY_URL="))
        .expect("the README's Valkey command");
    let url = command
        .trim_start_matches("VALKEY_URL=")
        .split_whitespace()
        .next()
        .expect("url")
        .replace("127.0.0.1:6379", &format!("127.0.0.1:{}", valkey.port()));
    let addr = format!("127.0.0.1:{}", free_port());
    let _orch = start_orchestrator(&addr, Some(&url));
    let health: Value =
        serde_json::from_str(&sh(&format!("curl -s {addr}/health"), &addr)).expect("health JSON");
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["checks"]["store"]["kind"], "valkey");
}

/// `cargo tree` of the orchestrator (no build: it only resolves the locked graph), one
/// `name vX (features)` line per crate or feature.
fn orchestrator_tree(edges: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--locked",
            "--offline",
            "-p",
            "servicekit-orchestrator",
        ])
        .args(["-e", edges, "--prefix", "none"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_demo_compiles_no_benchmark_grpc_or_doc_ui_crates() {
    // Everything `cargo run -p servicekit-orchestrator --example demo` compiles.
    let demo = orchestrator_tree("normal,build,dev");
    assert!(
        demo.iter().any(|l| l.starts_with("axum ")),
        "the tree is the demo's: {demo:?}"
    );
    for heavy in [
        "criterion",
        "tonic",
        "tonic-health",
        "prost",
        "utoipa",
        "utoipa-swagger-ui",
        "serde_norway",
    ] {
        let hit = demo
            .iter()
            .find(|l| l.split_whitespace().next() == Some(heavy));
        assert!(
            hit.is_none(),
            "the README's first command compiles {heavy}: the orchestrator's (dev-)dependencies pull it in ({hit:?})"
        );
    }
}

#[test]
fn the_orchestrator_builds_servicekit_without_the_client() {
    let features = orchestrator_tree("normal,features");
    let enabled: Vec<&String> = features
        .iter()
        .filter(|l| l.starts_with("servicekit feature "))
        .collect();
    assert!(
        enabled.iter().any(|l| l.contains("\"signal\"")),
        "the orchestrator uses servicekit::signal: {enabled:?}"
    );
    assert!(
        !enabled
            .iter()
            .any(|l| l.contains("\"layer\"") || l.contains("\"default\"")),
        "the orchestrator binary compiles the registration client: {enabled:?}"
    );
}
