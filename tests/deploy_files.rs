//! Static checks of the deployment files (compose/docker-compose.yml, compose/k8s/**/*.yaml,
//! Dockerfile, .dockerignore): against each other, against the flags and environment variables
//! the binaries accept, and against the registration rules (reference defects #10 and #11).
//!
//! Each file is checked by a function that lists its problems; the `*_are_consistent` tests want
//! none, and the `mutations_*` tests break one thing at a time in the real text and want the
//! checks to notice, so that none of them passes vacuously.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use clap::CommandFactory;
use serde::Deserialize;
use serde_norway::Value;

// The repository root: this test belongs to the `servicekit-tests` package in tests/.
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const COMPOSE: &str = "compose/docker-compose.yml";
const K8S: [&str; 3] = [
    "compose/k8s/base/orchestrator.yaml",
    "compose/k8s/valkey.yaml",
    "compose/k8s/base/service.yaml",
];
const ORCHESTRATOR_BIN: &str = "/usr/local/bin/orchestrator";
const SERVICE_BIN: &str = "/usr/local/bin/service";
const REGISTER_URL: &str = "http://orchestrator:9000/services/$register";
/// The library's deregistration timeout (`timeout`, 10 s by default).
const DEREGISTER_TIMEOUT_SECS: u64 = 10;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml_docs(text: &str) -> Result<Vec<Value>, String> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).map_err(|e| e.to_string()))
        .filter(|doc| !matches!(doc, Ok(Value::Null)))
        .collect()
}

/// Collected problems of one file (or set of files).
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }
}

macro_rules! check {
    ($p:expr, $ok:expr, $($fmt:tt)+) => {
        $p.check($ok, || format!($($fmt)+))
    };
}

fn assert_no_problems(file: &str, problems: Problems) {
    assert!(
        problems.0.is_empty(),
        "{file}:\n  - {}",
        problems.0.join("\n  - ")
    );
}

/// A scalar as text (compose and k8s accept numbers and booleans in many string places).
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A string or a list of strings (entrypoint, command, healthcheck test).
fn words(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Sequence(items)) => items.iter().filter_map(scalar).collect(),
        Some(v) => scalar(v).into_iter().collect(),
        None => Vec::new(),
    }
}

/// Compose interpolation with an empty environment: `$$` is a literal `$`, `${X:-d}` and
/// `${X-d}` give `d`, any other `${X}` or `$X` gives the empty string.
fn compose_interpolate(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some('$') => {
                chars.next();
                out.push('$');
            }
            Some('{') => {
                chars.next();
                let inner: String = chars.by_ref().take_while(|&c| c != '}').collect();
                if let Some((_, default)) = inner.split_once(":-").or(inner.split_once('-')) {
                    out.push_str(default);
                }
            }
            Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
                while chars
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
                {
                    chars.next();
                }
            }
            _ => out.push('$'),
        }
    }
    out
}

/// A compose duration ("30s", "1m30s", "1500ms") in milliseconds.
fn compose_duration_ms(s: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "h" => 3_600_000,
            "m" => 60_000,
            "s" => 1_000,
            "ms" => 1,
            _ => return None,
        };
        total += n * factor;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// Every environment variable the orchestrator binary reads, mapped to its long flag (from its
/// clap definition: what `--help` documents).
fn orchestrator_env_flags() -> BTreeMap<String, String> {
    let cli = servicekit_orchestrator::config::Cli::command();
    let mut flags = BTreeMap::new();
    let commands = std::iter::once(&cli).chain(cli.get_subcommands());
    for command in commands {
        for arg in command.get_arguments() {
            if let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) {
                flags.insert(env.to_string_lossy().into_owned(), format!("--{long}"));
            }
        }
    }
    flags
}

/// Checks an orchestrator environment: every name is one the binary reads, and the values
/// parse as its flags would.
fn check_orchestrator_env(p: &mut Problems, whose: &str, env: &BTreeMap<String, String>) {
    let flags = orchestrator_env_flags();
    let mut args = vec!["orchestrator".to_owned()];
    for (name, value) in env {
        match flags.get(name) {
            Some(flag) if name != "ORCHESTRATOR_HEALTHCHECK_URL" => {
                args.push(format!("{flag}={value}"));
            }
            Some(_) => {}
            None => p.0.push(format!(
                "{whose}: the orchestrator reads no {name} (it reads {:?})",
                flags.keys().collect::<Vec<_>>()
            )),
        }
    }
    if let Err(e) = parse_orchestrator_args(&args) {
        p.0.push(format!("{whose}: the orchestrator rejects {args:?}: {e}"));
    }
}

/// Environment variables the example service (library or example code) reads.
fn service_env_names() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = [
        servicekit::config::ORCHESTRATOR_URL_ENV,
        servicekit::config::HOST_ENV,
        servicekit::config::PORT_ENV,
        servicekit::config::REGISTRATION_KEY_ENV,
    ]
    .map(str::to_owned)
    .into();
    // The example reads a few more of its own, by literal name.
    let example = read("examples/service.rs");
    for (at, _) in example.match_indices('"') {
        let rest = &example[at + 1..];
        let len = rest
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..len];
        if rest[len..].starts_with('"')
            && (name.starts_with("SERVICEKIT_") || name.starts_with("SERVICE_"))
        {
            names.insert(name.to_owned());
        }
    }
    names
}

/// Parses orchestrator arguments as the binary would, ignoring this process's environment.
fn parse_orchestrator_args(args: &[String]) -> Result<(), clap::Error> {
    let mut command = servicekit_orchestrator::config::Cli::command();
    let ids: Vec<_> = command
        .get_arguments()
        .map(|a| a.get_id().clone())
        .collect();
    for id in ids {
        command = command.mut_arg(id, |a| a.env(None::<&'static str>));
    }
    command.try_get_matches_from(args).map(|_| ())
}

/// What a URL points at: (host, port).
fn host_port(url: &str) -> Option<(String, u16)> {
    let url = url::Url::parse(url).ok()?;
    Some((url.host_str()?.to_owned(), url.port_or_known_default()?))
}

// ---------------------------------------------------------------------------------------------
// Compose

fn compose_env(service: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    match service.get("environment") {
        Some(Value::Mapping(m)) => {
            for (k, v) in m {
                if let Some(k) = scalar(k) {
                    env.insert(k, scalar(v).unwrap_or_default());
                }
            }
        }
        Some(Value::Sequence(items)) => {
            for item in items.iter().filter_map(scalar) {
                let (k, v) = item.split_once('=').unwrap_or((&item, ""));
                env.insert(k.to_owned(), v.to_owned());
            }
        }
        _ => {}
    }
    env
}

/// Port mappings as "published:target".
fn compose_ports(service: &Value) -> Vec<String> {
    let Some(Value::Sequence(ports)) = service.get("ports") else {
        return Vec::new();
    };
    ports
        .iter()
        .filter_map(|p| match p {
            Value::Mapping(_) => Some(format!(
                "{}:{}",
                p.get("published").and_then(scalar).unwrap_or_default(),
                p.get("target").and_then(scalar).unwrap_or_default()
            )),
            p => scalar(p),
        })
        .collect()
}

fn compose_condition(service: &Value, dependency: &str) -> Option<String> {
    match service.get("depends_on")? {
        Value::Mapping(m) => {
            let dep = m.get(dependency)?;
            Some(
                dep.get("condition")
                    .and_then(scalar)
                    .unwrap_or_else(|| "service_started".into()),
            )
        }
        Value::Sequence(s) => s
            .iter()
            .any(|d| d.as_str() == Some(dependency))
            .then(|| "service_started".into()),
        _ => None,
    }
}

/// The healthcheck command, or None when there is none or it is disabled.
fn compose_healthcheck(service: &Value) -> Option<Vec<String>> {
    let hc = service.get("healthcheck")?;
    if hc.get("disable").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    let test = match hc.get("test")? {
        Value::String(s) => vec!["CMD-SHELL".to_owned(), s.clone()],
        v => words(Some(v)),
    };
    (test.first().map(String::as_str) != Some("NONE") && test.len() > 1).then_some(test)
}

/// The value of `--flag` in a command line.
fn flag_value<'a>(words: &'a [String], flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    words.iter().enumerate().find_map(|(i, w)| {
        if w == flag {
            words.get(i + 1).map(String::as_str)
        } else {
            w.strip_prefix(&prefix)
        }
    })
}

fn compose_problems(text: &str) -> Problems {
    let mut p = Problems::default();
    let doc = match serde_norway::from_str::<Value>(text) {
        Ok(doc) => doc,
        Err(e) => {
            p.0.push(format!("not YAML: {e}"));
            return p;
        }
    };
    let null = Value::Null;
    let service = |name: &str| doc.get("services").and_then(|s| s.get(name));
    for name in ["valkey", "orchestrator", "svca", "svcb"] {
        check!(p, service(name).is_some(), "no service {name}");
    }

    // Valkey.
    let valkey = service("valkey").unwrap_or(&null);
    check!(
        p,
        valkey
            .get("image")
            .and_then(Value::as_str)
            .is_some_and(|i| i.starts_with("valkey/valkey:8")),
        "valkey: image is not valkey/valkey:8"
    );
    let test = compose_healthcheck(valkey).unwrap_or_default();
    check!(
        p,
        test.iter().any(|w| w.contains("valkey-cli")) && test.iter().any(|w| w.contains("ping")),
        "valkey: healthcheck is not `valkey-cli ping`: {test:?}"
    );

    // The orchestrator.
    let orch = service("orchestrator").unwrap_or(&null);
    let context = orch
        .get("build")
        .and_then(|b| b.get("context").or(Some(b)))
        .and_then(Value::as_str)
        .unwrap_or("");
    let dockerfile = orch
        .get("build")
        .and_then(|b| b.get("dockerfile"))
        .and_then(Value::as_str)
        .unwrap_or("Dockerfile");
    let built = Path::new(ROOT)
        .join("compose")
        .join(context)
        .join(dockerfile);
    check!(
        p,
        !context.is_empty() && built.is_file() && built.canonicalize().ok() == Path::new(ROOT).join("Dockerfile").canonicalize().ok(),
        "orchestrator: does not build the repository's Dockerfile (context {context:?}, dockerfile {dockerfile:?})"
    );
    let image = orch.get("image").and_then(Value::as_str);
    check!(
        p,
        image.is_some(),
        "orchestrator: the built image has no name (image:)"
    );
    let env = compose_env(orch);
    let env: BTreeMap<String, String> = env
        .into_iter()
        .map(|(k, v)| (k, compose_interpolate(&v)))
        .collect();
    check_orchestrator_env(&mut p, "orchestrator", &env);
    check!(
        p,
        env.get("VALKEY_URL").and_then(|u| host_port(u)) == Some(("valkey".into(), 6379)),
        "orchestrator: VALKEY_URL is not redis://valkey:6379: {:?}",
        env.get("VALKEY_URL")
    );
    check!(
        p,
        env.get("ORCHESTRATOR_PUBLIC_URL").map(String::as_str) == Some("http://orchestrator:9000"),
        "orchestrator: ORCHESTRATOR_PUBLIC_URL is not http://orchestrator:9000: {:?}",
        env.get("ORCHESTRATOR_PUBLIC_URL")
    );
    check!(
        p,
        compose_ports(orch).contains(&"9000:9000".to_owned()),
        "orchestrator: no 9000:9000 port mapping: {:?}",
        compose_ports(orch)
    );
    let test = compose_healthcheck(orch).unwrap_or_default();
    check!(
        p,
        test.len() >= 3
            && test[0] == "CMD"
            && test[1] == ORCHESTRATOR_BIN
            && test[2] == "healthcheck",
        "orchestrator: healthcheck is not [CMD, {ORCHESTRATOR_BIN}, healthcheck, ...]: {test:?}"
    );
    check!(
        p,
        compose_condition(orch, "valkey").as_deref() == Some("service_healthy"),
        "orchestrator: does not depend on valkey being healthy"
    );

    // The two services.
    let mut display_names = BTreeMap::new();
    let known = service_env_names();
    for (name, mapping) in [("svca", "8000:8000"), ("svcb", "8001:8000")] {
        let svc = service(name).unwrap_or(&null);
        check!(
            p,
            svc.get("image").and_then(Value::as_str) == image,
            "{name}: does not run the image the orchestrator service builds ({image:?})"
        );
        let entry = words(svc.get("entrypoint"));
        check!(
            p,
            entry.first().map(String::as_str) == Some(SERVICE_BIN),
            "{name}: entrypoint is not {SERVICE_BIN}: {entry:?}"
        );
        // Defect #10: without `hostname:` the container id is registered.
        check!(
            p,
            svc.get("hostname").and_then(Value::as_str) == Some(name),
            "{name}: hostname is not {name:?}: {:?}",
            svc.get("hostname")
        );
        let raw = compose_env(svc);
        for var in raw.keys() {
            check!(p, known.contains(var), "{name}: the service reads no {var}");
        }
        check!(
            p,
            !raw.contains_key(servicekit::config::HOST_ENV),
            "{name}: SERVICEKIT_HOST overrides the hostname auto-detection"
        );
        let env: BTreeMap<String, String> = raw
            .iter()
            .map(|(k, v)| (k.clone(), compose_interpolate(v)))
            .collect();
        let display = env.get("SERVICE_DISPLAY_NAME").cloned().unwrap_or_default();
        check!(p, !display.is_empty(), "{name}: no SERVICE_DISPLAY_NAME");
        if let Some(other) = display_names.insert(display.clone(), name) {
            p.0.push(format!(
                "{name}: display name {display:?} is also {other}'s"
            ));
        }
        let ports = compose_ports(svc);
        check!(
            p,
            ports == [mapping],
            "{name}: ports are not [{mapping}]: {ports:?}"
        );
        let container_port = mapping.rsplit(':').next().unwrap_or_default();
        check!(
            p,
            env.get("SERVICEKIT_PORT").map(String::as_str) == Some(container_port),
            "{name}: SERVICEKIT_PORT is not the container port {container_port}: {:?}",
            env.get("SERVICEKIT_PORT")
        );
        let url = raw
            .get("SERVICEKIT_ORCHESTRATOR_URL")
            .cloned()
            .unwrap_or_default();
        check!(
            p,
            url.contains("$$register"),
            "{name}: SERVICEKIT_ORCHESTRATOR_URL lacks the compose escape $$register: {url:?}"
        );
        check!(
            p,
            compose_interpolate(&url) == REGISTER_URL,
            "{name}: SERVICEKIT_ORCHESTRATOR_URL becomes {:?}, not {REGISTER_URL:?}",
            compose_interpolate(&url)
        );
        check!(
            p,
            compose_condition(svc, "orchestrator").as_deref() == Some("service_healthy"),
            "{name}: does not depend on the orchestrator being healthy"
        );
        // The image's HEALTHCHECK checks port 9000: a service must check its own port.
        let test = compose_healthcheck(svc).unwrap_or_default();
        let checks_own_port = test.iter().any(|w| w.contains("healthcheck"))
            && flag_value(&test, "--url").and_then(host_port)
                == Some(("127.0.0.1".into(), container_port.parse().unwrap_or(0)));
        let checks_own_port = checks_own_port
            || test
                .iter()
                .any(|w| w.contains(&format!(":{container_port}/health")));
        check!(
            p,
            checks_own_port,
            "{name}: healthcheck does not check its own port {container_port}: {test:?}"
        );
        check!(
            p,
            svc.get("stop_signal")
                .and_then(Value::as_str)
                .unwrap_or("SIGTERM")
                == "SIGTERM",
            "{name}: stop_signal is not SIGTERM"
        );
        // Defect #11: SIGTERM deregisters (bounded by the timeout), then drains.
        let grace = svc
            .get("stop_grace_period")
            .and_then(Value::as_str)
            .and_then(compose_duration_ms)
            .unwrap_or(10_000);
        check!(
            p,
            grace >= 15_000,
            "{name}: stop_grace_period {grace} ms leaves no time to deregister and drain"
        );
    }
    p
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

/// Instructions as (KEYWORD, arguments), continuation lines joined, comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (current.is_empty() && trimmed.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push((keyword.to_ascii_uppercase(), args.trim().to_owned()));
        current.clear();
    }
    out
}

/// The JSON (exec) form of CMD/ENTRYPOINT arguments.
fn exec_form(args: &str) -> Option<Vec<String>> {
    serde_json::from_str(args).ok()
}

fn dockerfile_problems(text: &str) -> Problems {
    let mut p = Problems::default();
    let instructions = dockerfile_instructions(text);
    let args: BTreeMap<String, String> = instructions
        .iter()
        .filter(|(k, _)| k == "ARG")
        .filter_map(|(_, a)| a.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let expand = |s: &str| {
        let mut s = s.to_owned();
        for (k, v) in &args {
            s = s
                .replace(&format!("${{{k}}}"), v)
                .replace(&format!("${k}"), v);
        }
        s
    };
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, _)| i)
        .collect();
    check!(
        p,
        stages.len() >= 2,
        "not a multi-stage build: {} FROM",
        stages.len()
    );
    if stages.len() < 2 {
        return p;
    }
    let builder = &instructions[stages[0]..stages[stages.len() - 1]];
    let runtime = &instructions[stages[stages.len() - 1]..];

    // Builder: an official Rust image on bookworm, not older than the workspace's MSRV.
    let from = expand(&builder[0].1);
    let image = from.split_whitespace().next().unwrap_or_default();
    let tag = image.strip_prefix("rust:").unwrap_or_default();
    check!(
        p,
        tag.ends_with("-bookworm"),
        "builder is not an official rust:*-bookworm image: {image}"
    );
    let msrv = read("Cargo.toml")
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("rust-version = \"")
                .map(|v| v.trim_end_matches('"').to_owned())
        })
        .unwrap_or_default();
    let version = |v: &str| -> Vec<u32> { v.split('.').map_while(|n| n.parse().ok()).collect() };
    let msrv = version(&msrv);
    let recent_enough = match (
        version(tag.trim_end_matches("-bookworm")).as_slice(),
        msrv.as_slice(),
    ) {
        // `rust:1-bookworm`: the newest 1.x.
        ([1], _) => true,
        ([major, minor, ..], [m, n, ..]) => (major, minor) >= (m, n),
        _ => false,
    };
    check!(
        p,
        recent_enough,
        "builder Rust {tag} is older than the workspace's rust-version {msrv:?}"
    );
    let runs: String = builder
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, a)| a.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(" ; ");
    for build in [
        "cargo build --release --locked -p servicekit-orchestrator --bin orchestrator",
        "cargo build --release --locked --example service",
    ] {
        check!(
            p,
            runs.contains(build),
            "the builder does not run `{build}`"
        );
    }

    // Runtime: debian slim (the same glibc as the builder), both binaries, non-root.
    let from = expand(&runtime[0].1);
    check!(
        p,
        from.starts_with("debian:bookworm-slim"),
        "the runtime image is not debian:bookworm-slim: {from}"
    );
    let copies: Vec<&String> = runtime
        .iter()
        .filter(|(k, _)| k == "COPY")
        .map(|(_, a)| a)
        .collect();
    for (bin, built) in [(ORCHESTRATOR_BIN, "orchestrator"), (SERVICE_BIN, "service")] {
        check!(
            p,
            copies.iter().any(|c| c.contains("--from=")
                && c.split_whitespace().last() == Some(bin)
                && c.contains(built)),
            "the runtime does not COPY --from the builder to {bin}: {copies:?}"
        );
    }
    let user = runtime
        .iter()
        .rfind(|(k, _)| k == "USER")
        .map(|(_, a)| a.clone());
    let uid = user
        .as_deref()
        .and_then(|u| u.split(':').next())
        .and_then(|u| u.parse::<u32>().ok());
    check!(
        p,
        uid.is_some_and(|u| u != 0),
        "the runtime USER is not a numeric non-root uid: {user:?}"
    );
    let last = |kw: &str| {
        runtime
            .iter()
            .rfind(|(k, _)| k == kw)
            .map(|(_, a)| a.clone())
            .unwrap_or_default()
    };
    check!(
        p,
        exec_form(&last("ENTRYPOINT")) == Some(vec![ORCHESTRATOR_BIN.to_owned()]),
        "ENTRYPOINT is not [\"{ORCHESTRATOR_BIN}\"]: {}",
        last("ENTRYPOINT")
    );
    let healthcheck = last("HEALTHCHECK");
    let cmd = healthcheck
        .split_once("CMD ")
        .and_then(|(_, c)| exec_form(c.trim()))
        .unwrap_or_default();
    check!(
        p,
        cmd == [ORCHESTRATOR_BIN, "healthcheck"],
        "HEALTHCHECK is not CMD [\"{ORCHESTRATOR_BIN}\", \"healthcheck\"]: {healthcheck}"
    );
    let exposed: BTreeSet<String> = runtime
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, a)| {
            a.split_whitespace()
                .map(|p| p.trim_end_matches("/tcp").to_owned())
        })
        .collect();
    for port in ["9000", "8000"] {
        check!(
            p,
            exposed.contains(port),
            "port {port} is not EXPOSEd: {exposed:?}"
        );
    }
    check!(
        p,
        last("STOPSIGNAL") == "SIGTERM" || last("STOPSIGNAL").is_empty(),
        "STOPSIGNAL is not SIGTERM: {}",
        last("STOPSIGNAL")
    );
    p
}

fn dockerignore_problems(text: &str) -> Problems {
    let mut p = Problems::default();
    let patterns: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches("./").trim_end_matches('/'))
        .collect();
    for excluded in ["target", ".git"] {
        check!(
            p,
            patterns.contains(&excluded),
            ".dockerignore does not exclude {excluded}/"
        );
    }
    // What `cargo build --locked` of the workspace needs (Cargo.toml declares the benches).
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "src",
        "orchestrator",
        "examples",
        "benches",
    ] {
        check!(
            p,
            !patterns
                .iter()
                .any(|pat| *pat == needed || *pat == "*" || *pat == "**"),
            ".dockerignore excludes {needed}, which the build needs"
        );
    }
    p
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

struct K8s {
    docs: Vec<Value>,
}

impl K8s {
    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.docs.iter().find(|d| {
            d.get("kind").and_then(Value::as_str) == Some(kind)
                && d.get("metadata")
                    .and_then(|m| m.get("name"))
                    .and_then(Value::as_str)
                    == Some(name)
        })
    }
}

fn pod_spec(deployment: &Value) -> Option<&Value> {
    deployment.get("spec")?.get("template")?.get("spec")
}

fn first_container(deployment: &Value) -> Option<&Value> {
    pod_spec(deployment)?
        .get("containers")?
        .as_sequence()?
        .first()
}

/// A named or numbered container port, as a number.
fn container_port(container: &Value, port: &Value) -> Option<u64> {
    if let Some(n) = port.as_u64() {
        return Some(n);
    }
    let name = port.as_str()?;
    container
        .get("ports")?
        .as_sequence()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))?
        .get("containerPort")?
        .as_u64()
}

/// (path, port) of an httpGet probe.
fn http_probe(container: &Value, probe: &str) -> Option<(String, u64)> {
    let get = container.get(probe)?.get("httpGet")?;
    Some((
        get.get("path")?.as_str()?.to_owned(),
        container_port(container, get.get("port")?)?,
    ))
}

fn k8s_env(container: &Value) -> BTreeMap<String, Value> {
    container
        .get("env")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e.get("name")?.as_str()?.to_owned(), e.clone())))
        .collect()
}

fn k8s_value(env: &BTreeMap<String, Value>, name: &str) -> Option<String> {
    env.get(name)?.get("value").and_then(scalar)
}

/// Checks that the Service `name` selects the Deployment `name`'s pods on `port`.
fn check_k8s_service(p: &mut Problems, k8s: &K8s, name: &str, port: u64) {
    let (Some(service), Some(deployment)) =
        (k8s.find("Service", name), k8s.find("Deployment", name))
    else {
        p.0.push(format!("no Deployment and Service named {name}"));
        return;
    };
    let selector = service
        .get("spec")
        .and_then(|s| s.get("selector"))
        .and_then(Value::as_mapping);
    let labels = deployment
        .get("spec")
        .and_then(|s| s.get("template"))
        .and_then(|t| t.get("metadata"))
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_mapping);
    let selects = match (selector, labels) {
        (Some(sel), Some(labels)) => {
            !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
        }
        _ => false,
    };
    check!(
        p,
        selects,
        "Service {name} does not select Deployment {name}'s pods"
    );
    let deployment_selector = deployment
        .get("spec")
        .and_then(|s| s.get("selector"))
        .and_then(|s| s.get("matchLabels"))
        .and_then(Value::as_mapping);
    let matches = match (deployment_selector, labels) {
        (Some(sel), Some(labels)) => sel.iter().all(|(k, v)| labels.get(k) == Some(v)),
        _ => false,
    };
    check!(
        p,
        matches,
        "Deployment {name}'s selector does not match its pod labels"
    );
    let container = first_container(deployment).unwrap_or(&Value::Null);
    let ports = service
        .get("spec")
        .and_then(|s| s.get("ports"))
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    let serves = ports.iter().any(|sp| {
        sp.get("port").and_then(Value::as_u64) == Some(port)
            && container_port(
                container,
                sp.get("targetPort").unwrap_or(&Value::from(port)),
            ) == Some(port)
    });
    check!(
        p,
        serves,
        "Service {name} does not route port {port} to the container's {port}"
    );
}

/// Every YAML document of `texts`; a text that is not YAML is a problem.
fn k8s_docs(texts: &[String], p: &mut Problems) -> K8s {
    let mut docs = Vec::new();
    for text in texts {
        match yaml_docs(text) {
            Ok(d) => docs.extend(d),
            Err(e) => p.0.push(format!("not YAML: {e}")),
        }
    }
    K8s { docs }
}

fn k8s_problems(texts: &[String]) -> Problems {
    let mut p = Problems::default();
    let k8s = k8s_docs(texts, &mut p);
    for doc in &k8s.docs {
        check!(
            p,
            doc.get("apiVersion").is_some() && doc.get("kind").is_some(),
            "a document without apiVersion/kind"
        );
    }
    check_k8s_service(&mut p, &k8s, "orchestrator", 9000);
    check_k8s_service(&mut p, &k8s, "valkey", 6379);
    check_k8s_service(&mut p, &k8s, "svca", 8000);

    let null = Value::Null;
    let dockerfile_uid = dockerfile_instructions(&read("Dockerfile"))
        .into_iter()
        .rfind(|(k, _)| k == "USER")
        .and_then(|(_, u)| u.split(':').next()?.parse::<u64>().ok());

    // The orchestrator.
    let orch = k8s.find("Deployment", "orchestrator").unwrap_or(&null);
    let c = first_container(orch).unwrap_or(&null);
    let image = c.get("image").and_then(Value::as_str);
    for probe in ["readinessProbe", "livenessProbe"] {
        check!(
            p,
            http_probe(c, probe) == Some(("/health".into(), 9000)),
            "orchestrator: {probe} is not GET /health on 9000: {:?}",
            http_probe(c, probe)
        );
    }
    let env = k8s_env(c);
    let values: BTreeMap<String, String> = env
        .keys()
        .map(|k| (k.clone(), k8s_value(&env, k).unwrap_or_default()))
        .collect();
    check_orchestrator_env(&mut p, "k8s orchestrator", &values);
    let valkey = values.get("VALKEY_URL").and_then(|u| host_port(u));
    check!(
        p,
        valkey == Some(("valkey".into(), 6379)),
        "orchestrator: VALKEY_URL does not point at the valkey Service: {valkey:?}"
    );
    check!(
        p,
        values.get("ORCHESTRATOR_PUBLIC_URL").map(String::as_str)
            == Some("http://orchestrator:9000"),
        "orchestrator: ORCHESTRATOR_PUBLIC_URL is not http://orchestrator:9000"
    );

    // The example service.
    let svc = k8s.find("Deployment", "svca").unwrap_or(&null);
    let c = first_container(svc).unwrap_or(&null);
    check!(
        p,
        c.get("image").and_then(Value::as_str) == image && image.is_some(),
        "svca: does not run the orchestrator's image (one image holds both binaries)"
    );
    check!(
        p,
        words(c.get("command")).first().map(String::as_str) == Some(SERVICE_BIN),
        "svca: command is not {SERVICE_BIN}"
    );
    let env = k8s_env(c);
    let known = service_env_names();
    for var in env.keys() {
        check!(p, known.contains(var), "svca: the service reads no {var}");
    }
    let host_field = env.get("SERVICEKIT_HOST").and_then(|e| {
        e.get("valueFrom")?
            .get("fieldRef")?
            .get("fieldPath")?
            .as_str()
    });
    check!(
        p,
        host_field == Some("status.podIP"),
        "svca: SERVICEKIT_HOST is not the pod IP (valueFrom.fieldRef status.podIP): {host_field:?}"
    );
    let port = k8s_value(&env, "SERVICEKIT_PORT");
    let ports: Vec<u64> = c
        .get("ports")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("containerPort")?.as_u64())
        .collect();
    check!(
        p,
        port.as_deref() == Some("8000") && ports == [8000],
        "svca: SERVICEKIT_PORT {port:?} is not the container port 8000 ({ports:?})"
    );
    let url = k8s_value(&env, "SERVICEKIT_ORCHESTRATOR_URL");
    check!(
        p,
        url.as_deref() == Some(REGISTER_URL),
        "svca: SERVICEKIT_ORCHESTRATOR_URL is not {REGISTER_URL} (no $$ in Kubernetes): {url:?}"
    );
    check!(
        p,
        http_probe(c, "readinessProbe") == Some(("/health".into(), 8000)),
        "svca: readinessProbe is not GET /health on 8000: {:?}",
        http_probe(c, "readinessProbe")
    );
    let pre_stop = c.get("lifecycle").and_then(|l| l.get("preStop"));
    let pause = pre_stop.and_then(|h| {
        if let Some(secs) = h.get("sleep").and_then(|s| s.get("seconds")) {
            return secs.as_u64();
        }
        let cmd = words(h.get("exec").and_then(|e| e.get("command")));
        let at = cmd
            .iter()
            .position(|w| w == "sleep" || w.ends_with("/sleep"))?;
        cmd.get(at + 1)?.parse().ok()
    });
    check!(
        p,
        pause.is_some_and(|s| s > 0),
        "svca: no preStop pause (exec sleep N or sleep action): {pre_stop:?}"
    );
    let grace = pod_spec(svc)
        .and_then(|s| s.get("terminationGracePeriodSeconds"))
        .and_then(Value::as_u64)
        .unwrap_or(30);
    let pause = pause.unwrap_or(0);
    check!(
        p,
        grace > pause + DEREGISTER_TIMEOUT_SECS,
        "svca: terminationGracePeriodSeconds {grace} does not exceed preStop {pause} + deregister \
         timeout {DEREGISTER_TIMEOUT_SECS} (plus drain)"
    );

    // The image's user, where a pod insists on one.
    for name in ["orchestrator", "svca"] {
        let spec = k8s
            .find("Deployment", name)
            .and_then(pod_spec)
            .unwrap_or(&null);
        if let Some(uid) = spec
            .get("securityContext")
            .and_then(|s| s.get("runAsUser"))
            .and_then(Value::as_u64)
        {
            check!(
                p,
                Some(uid) == dockerfile_uid && uid != 0,
                "{name}: runAsUser {uid} is not the Dockerfile's non-root USER {dockerfile_uid:?}"
            );
        }
    }
    p
}

fn k8s_texts() -> Vec<String> {
    K8S.iter().map(|f| read(f)).collect()
}

// ---------------------------------------------------------------------------------------------
// The Valkey Cluster variants: compose/docker-compose.cluster.yml and compose/k8s/cluster/

const COMPOSE_CLUSTER: &str = "compose/docker-compose.cluster.yml";
const K8S_CLUSTER: [&str; 2] = [
    "compose/k8s/cluster/kustomization.yaml",
    "compose/k8s/cluster/valkey-cluster.yaml",
];

/// The seed nodes of a cluster `VALKEY_URL` (`redis-cluster://h1:p1,h2:p2`), or why not.
fn cluster_seeds(url: &str) -> Result<Vec<(String, u16)>, String> {
    let rest = url
        .strip_prefix("redis-cluster://")
        .or_else(|| url.strip_prefix("valkey-cluster://"))
        .ok_or_else(|| format!("not a cluster URL: {url:?}"))?;
    rest.split(',')
        .map(|h| host_port(&format!("redis://{h}")).ok_or_else(|| format!("bad seed {h:?}")))
        .collect()
}

/// A command's words whatever its form (a list, or one shell string).
fn command_text(v: Option<&Value>) -> String {
    words(v).join(" ")
}

fn compose_cluster_problems(text: &str) -> Problems {
    let mut p = Problems::default();
    let mut doc = match serde_norway::from_str::<Value>(text) {
        Ok(doc) => doc,
        Err(e) => {
            p.0.push(format!("not YAML: {e}"));
            return p;
        }
    };
    if let Err(e) = doc.apply_merge() {
        p.0.push(format!("merge keys: {e}"));
    }
    // Merge keys nest (an anchor's environment merged into another environment).
    if let Some(services) = doc.get_mut("services").and_then(Value::as_mapping_mut) {
        for (_, svc) in services.iter_mut() {
            if let Some(env) = svc.get_mut("environment") {
                let _ = env.apply_merge();
            }
        }
    }
    let null = Value::Null;
    let service = |name: &str| doc.get("services").and_then(|s| s.get(name));
    let nodes: Vec<String> = (1..=6).map(|n| format!("valkey-{n}")).collect();
    for node in &nodes {
        let svc = service(node).unwrap_or(&null);
        let command = command_text(svc.get("command"));
        check!(
            p,
            svc.get("image")
                .and_then(Value::as_str)
                .is_some_and(|i| i.starts_with("valkey/valkey:8")),
            "{node}: image is not valkey/valkey:8"
        );
        check!(
            p,
            command.contains("--cluster-enabled yes"),
            "{node}: not started with --cluster-enabled yes: {command:?}"
        );
        check!(
            p,
            command.contains(&format!("--cluster-announce-hostname {node} ")),
            "{node}: does not announce its own name: {command:?}"
        );
    }
    let init = command_text(service("valkey-init").and_then(|s| s.get("command")));
    check!(
        p,
        init.contains("--cluster create")
            && init.contains("--cluster-replicas 1")
            && init.contains("for n in 1 2 3 4 5 6")
            && init.contains("valkey-$$n"),
        "valkey-init: does not create the cluster of the six nodes with one replica each"
    );
    for node in &nodes {
        check!(
            p,
            compose_condition(service("valkey-init").unwrap_or(&null), node).as_deref()
                == Some("service_healthy"),
            "valkey-init: does not wait for {node}"
        );
    }

    let orchestrators = ["orchestrator-1", "orchestrator-2"];
    let mut all_seeds = BTreeSet::new();
    for name in orchestrators {
        let orch = service(name).unwrap_or(&null);
        check!(
            p,
            orch.get("image").and_then(Value::as_str) == Some("servicekit:local"),
            "{name}: does not run servicekit:local"
        );
        let env: BTreeMap<String, String> = compose_env(orch)
            .into_iter()
            .map(|(k, v)| (k, compose_interpolate(&v)))
            .collect();
        check_orchestrator_env(&mut p, name, &env);
        match cluster_seeds(env.get("VALKEY_URL").map(String::as_str).unwrap_or("")) {
            Ok(seeds) => {
                check!(p, seeds.len() >= 2, "{name}: only one seed node");
                for (host, port) in seeds {
                    check!(
                        p,
                        nodes.contains(&host) && port == 6379,
                        "{name}: seed {host}:{port} is not a cluster node"
                    );
                    all_seeds.insert(host);
                }
            }
            Err(e) => p.0.push(format!("{name}: VALKEY_URL: {e}")),
        }
        check!(
            p,
            env.get("ORCHESTRATOR_PUBLIC_URL") == Some(&format!("http://{name}:9000")),
            "{name}: ORCHESTRATOR_PUBLIC_URL is not http://{name}:9000"
        );
        check!(
            p,
            compose_condition(orch, "valkey-init").as_deref()
                == Some("service_completed_successfully"),
            "{name}: does not wait for the cluster to be created"
        );
        let test = compose_healthcheck(orch).unwrap_or_default();
        check!(
            p,
            test.get(1).map(String::as_str) == Some(ORCHESTRATOR_BIN),
            "{name}: no healthcheck"
        );
    }
    check!(
        p,
        all_seeds.len() == nodes.len(),
        "the orchestrators' seeds do not cover every node: {all_seeds:?}"
    );
    let mut used = BTreeSet::new();
    for svc_name in ["svca", "svcb"] {
        let svc = service(svc_name).unwrap_or(&null);
        let env = compose_env(svc);
        let url = compose_interpolate(
            env.get("SERVICEKIT_ORCHESTRATOR_URL")
                .map(String::as_str)
                .unwrap_or(""),
        );
        let through = orchestrators
            .iter()
            .find(|o| url == format!("http://{o}:9000/services/$register"));
        match through {
            Some(o) => {
                used.insert(*o);
                check!(
                    p,
                    compose_condition(svc, o).as_deref() == Some("service_healthy"),
                    "{svc_name}: does not wait for {o}"
                );
            }
            None => p.0.push(format!(
                "{svc_name}: registers at {url:?}, not through an orchestrator replica"
            )),
        }
        check!(
            p,
            svc.get("hostname").and_then(Value::as_str) == Some(svc_name),
            "{svc_name}: hostname is not {svc_name:?}"
        );
    }
    check!(
        p,
        used.len() == 2,
        "svca and svcb do not register through different replicas"
    );
    p
}

fn k8s_cluster_problems(texts: &[String]) -> Problems {
    let mut p = Problems::default();
    let k8s = k8s_docs(texts, &mut p);
    let null = Value::Null;
    let kustomization = k8s
        .docs
        .iter()
        .find(|d| d.get("kind").and_then(Value::as_str) == Some("Kustomization"))
        .unwrap_or(&null);
    let resources: Vec<String> = kustomization
        .get("resources")
        .and_then(Value::as_sequence)
        .map(|r| r.iter().filter_map(scalar).collect())
        .unwrap_or_default();
    // Kustomize loads files only from the kustomization's own folder; outside it, only
    // folders that have a kustomization of their own.
    for r in &resources {
        let path = Path::new(ROOT).join("compose/k8s/cluster").join(r);
        let ok = if r.starts_with("..") {
            path.join("kustomization.yaml").is_file()
        } else {
            path.is_file()
        };
        check!(p, ok, "kustomization: resource {r} cannot be loaded");
    }
    for wanted in ["valkey-cluster.yaml", "../base"] {
        check!(
            p,
            resources.iter().any(|r| r == wanted),
            "kustomization: {wanted} is not a resource"
        );
    }
    // The single-Valkey kustomization and the base list every manifest once: the base the
    // orchestrator and the service, the single one its Valkey and the base.
    let listed = |file: &str| -> Vec<String> {
        serde_norway::from_str::<Value>(&read(file))
            .ok()
            .and_then(|k| k.get("resources").and_then(Value::as_sequence).cloned())
            .map(|r| r.iter().filter_map(scalar).collect())
            .unwrap_or_default()
    };
    let mut everything: Vec<String> = listed("compose/k8s/base/kustomization.yaml")
        .iter()
        .map(|r| format!("compose/k8s/base/{r}"))
        .collect();
    let single = listed("compose/k8s/kustomization.yaml");
    check!(
        p,
        single.iter().any(|r| r == "base"),
        "compose/k8s/kustomization.yaml does not use the base"
    );
    everything.extend(
        single
            .iter()
            .filter(|r| *r != "base")
            .map(|r| format!("compose/k8s/{r}")),
    );
    everything.sort();
    let mut manifests: Vec<String> = K8S.iter().map(|f| (*f).to_owned()).collect();
    manifests.sort();
    check!(
        p,
        everything == manifests,
        "the kustomizations list {everything:?}, not the manifests {manifests:?}"
    );
    let patches: Vec<Value> = kustomization
        .get("patches")
        .and_then(Value::as_sequence)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p.get("patch")?.as_str())
                .filter_map(|t| serde_norway::from_str(t).ok())
                .collect()
        })
        .unwrap_or_default();
    // The JSON patch replaces one env entry by index: it must be the orchestrator's VALKEY_URL.
    let ops = patches
        .iter()
        .find(|t| t.is_sequence())
        .cloned()
        .unwrap_or(Value::Null);
    let op = ops.get(0).unwrap_or(&null);
    let path = op.get("path").and_then(Value::as_str).unwrap_or("");
    let base = yaml_docs(&read("compose/k8s/base/orchestrator.yaml")).unwrap_or_default();
    let base = K8s { docs: base };
    let orch_env = base
        .find("Deployment", "orchestrator")
        .and_then(first_container)
        .and_then(|c| c.get("env"))
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    let index = path
        .strip_prefix("/spec/template/spec/containers/0/env/")
        .and_then(|i| i.parse::<usize>().ok());
    check!(
        p,
        index
            .and_then(|i| orch_env.get(i))
            .and_then(|e| e.get("name"))
            .and_then(Value::as_str)
            == Some("VALKEY_URL"),
        "kustomization: the patch ({path}) does not replace the orchestrator's VALKEY_URL"
    );
    let value = op.get("value").unwrap_or(&null);
    let url = value.get("value").and_then(Value::as_str).unwrap_or("");
    check!(
        p,
        value.get("name").and_then(Value::as_str) == Some("VALKEY_URL"),
        "kustomization: the patch does not set VALKEY_URL"
    );
    let set = k8s.find("StatefulSet", "valkey-cluster").unwrap_or(&null);
    let replicas = set
        .get("spec")
        .and_then(|s| s.get("replicas"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    check!(
        p,
        replicas == 6,
        "valkey-cluster: {replicas} replicas, not 6"
    );
    match cluster_seeds(url) {
        Ok(seeds) => {
            check!(p, seeds.len() >= 2, "VALKEY_URL: only one seed node");
            for (host, port) in seeds {
                let pod = host
                    .strip_suffix(".valkey-cluster")
                    .and_then(|h| h.strip_prefix("valkey-cluster-"))
                    .and_then(|n| n.parse::<u64>().ok());
                check!(
                    p,
                    pod.is_some_and(|n| n < replicas) && port == 6379,
                    "VALKEY_URL: seed {host}:{port} is not a pod of the StatefulSet"
                );
            }
        }
        Err(e) => p.0.push(format!("VALKEY_URL: {e}")),
    }
    let container = first_container(set).unwrap_or(&null);
    let command = command_text(container.get("command"));
    check!(
        p,
        command.contains("--cluster-enabled yes")
            && command.contains("--cluster-announce-hostname $(POD_NAME).valkey-cluster"),
        "valkey-cluster: not a cluster node announcing its pod name: {command:?}"
    );
    let service = k8s.find("Service", "valkey-cluster").unwrap_or(&null);
    check!(
        p,
        service
            .get("spec")
            .and_then(|s| s.get("clusterIP"))
            .and_then(Value::as_str)
            == Some("None"),
        "valkey-cluster: the Service is not headless (pod DNS names need it)"
    );
    let job = k8s.find("Job", "valkey-cluster-create").unwrap_or(&null);
    let create = command_text(first_container(job).and_then(|c| c.get("command")));
    check!(
        p,
        create.contains("--cluster create")
            && create.contains("--cluster-replicas 1")
            && create.contains(&format!(
                "for n in {}",
                (0..replicas)
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
        "valkey-cluster-create: does not create the cluster of every pod with one replica each"
    );
    p
}

fn k8s_cluster_texts() -> Vec<String> {
    K8S_CLUSTER.iter().map(|f| read(f)).collect()
}

#[test]
fn cluster_deployment_files_are_consistent() {
    assert_no_problems(
        COMPOSE_CLUSTER,
        compose_cluster_problems(&read(COMPOSE_CLUSTER)),
    );
    assert_no_problems(
        "compose/k8s/cluster",
        k8s_cluster_problems(&k8s_cluster_texts()),
    );
}

#[test]
fn mutations_of_the_cluster_deployment_files_are_caught() {
    let text = read(COMPOSE_CLUSTER);
    for (from, to, needle) in [
        (
            "VALKEY_URL: redis-cluster://valkey-4:6379,valkey-5:6379,valkey-6:6379",
            "VALKEY_URL: redis://valkey-4:6379",
            "not a cluster URL",
        ),
        (
            "redis-cluster://valkey-1:6379,valkey-2:6379,valkey-3:6379",
            "redis-cluster://valkey-1:6379,valkey-2:6379,valkey-7:6379",
            "not a cluster node",
        ),
        (
            "--cluster-replicas 1",
            "--cluster-replicas 0",
            "valkey-init",
        ),
        (
            "orchestrator-2:9000/services/$$register",
            "orchestrator-1:9000/services/$$register",
            "different replicas",
        ),
        (
            "--cluster-announce-hostname, valkey-3,",
            "--cluster-announce-hostname, valkey-2,",
            "valkey-3: does not announce",
        ),
        (
            "condition: service_completed_successfully\n      # Built by orchestrator-1.",
            "condition: service_started\n      # Built by orchestrator-1.",
            "wait for the cluster",
        ),
    ] {
        assert_caught(
            COMPOSE_CLUSTER,
            compose_cluster_problems(&mutate(&text, from, to)),
            from,
            needle,
        );
    }
    let texts = k8s_cluster_texts();
    for (file, from, to, needle) in [
        (
            0,
            "env/0",
            "env/1",
            "does not replace the orchestrator's VALKEY_URL",
        ),
        (
            0,
            "valkey-cluster-2.valkey-cluster:6379",
            "valkey-cluster-6.valkey-cluster:6379",
            "not a pod",
        ),
        (
            0,
            "  - ../base\n",
            "  - ../base/orchestrator.yaml\n",
            "cannot be loaded",
        ),
        (1, "replicas: 6", "replicas: 5", "not 6"),
        (1, "clusterIP: None", "clusterIP: \"\"", "headless"),
        (
            1,
            "for n in 0 1 2 3 4 5",
            "for n in 0 1 2",
            "valkey-cluster-create",
        ),
    ] {
        let mut mutated = texts.clone();
        mutated[file] = mutate(&texts[file], from, to);
        assert_caught(
            K8S_CLUSTER[file],
            k8s_cluster_problems(&mutated),
            from,
            needle,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn compose_file_is_consistent() {
    assert_no_problems(COMPOSE, compose_problems(&read(COMPOSE)));
}

#[test]
fn dockerfile_is_consistent() {
    assert_no_problems("Dockerfile", dockerfile_problems(&read("Dockerfile")));
    assert_no_problems(
        ".dockerignore",
        dockerignore_problems(&read(".dockerignore")),
    );
}

#[test]
fn kubernetes_manifests_are_consistent() {
    assert_no_problems("compose/k8s", k8s_problems(&k8s_texts()));
}

#[test]
fn every_binary_the_deployments_run_is_in_the_image() {
    let copied: BTreeSet<String> = dockerfile_instructions(&read("Dockerfile"))
        .into_iter()
        .filter(|(k, _)| k == "COPY")
        .filter_map(|(_, a)| a.split_whitespace().last().map(str::to_owned))
        .collect();
    let compose: Value = serde_norway::from_str(&read(COMPOSE)).unwrap();
    let mut run = Vec::new();
    for (_, svc) in compose["services"].as_mapping().unwrap() {
        if svc.get("image").and_then(Value::as_str)
            == compose["services"]["orchestrator"]["image"].as_str()
        {
            run.extend(words(svc.get("entrypoint")).into_iter().take(1));
            run.extend(
                compose_healthcheck(svc)
                    .unwrap_or_default()
                    .into_iter()
                    .nth(1),
            );
        }
    }
    for doc in yaml_docs(&k8s_texts().join("\n---\n")).unwrap() {
        if let Some(c) = first_container(&doc) {
            run.extend(words(c.get("command")).into_iter().take(1));
        }
    }
    let ours: Vec<&String> = run
        .iter()
        .filter(|r| r.starts_with("/usr/local/bin/"))
        .collect();
    assert!(ours.len() >= 4, "too few binaries found: {run:?}");
    for bin in ours {
        assert!(
            copied.contains(bin),
            "{bin} is run but not copied into the image: {copied:?}"
        );
    }
}

#[test]
fn orchestrator_accepts_exactly_the_documented_variables() {
    let flags = orchestrator_env_flags();
    for var in [
        "ORCHESTRATOR_BIND",
        "VALKEY_URL",
        "ORCHESTRATOR_PUBLIC_URL",
        "ORCHESTRATOR_REGISTRATION_KEY",
        "ORCHESTRATOR_HEALTHCHECK_URL",
    ] {
        assert!(flags.contains_key(var), "{var} missing from {flags:?}");
    }
    let mut p = Problems::default();
    let env = BTreeMap::from([("ORCHESTRATOR_TTL".to_owned(), "5".to_owned())]);
    check_orchestrator_env(&mut p, "test", &env);
    assert!(
        p.0.iter().any(|e| e.contains("reads no ORCHESTRATOR_TTL")),
        "{:?}",
        p.0
    );
    let mut p = Problems::default();
    let env = BTreeMap::from([("ORCHESTRATOR_PUBLIC_URL".to_owned(), "ftp://x".to_owned())]);
    check_orchestrator_env(&mut p, "test", &env);
    assert!(p.0.iter().any(|e| e.contains("rejects")), "{:?}", p.0);
}

#[test]
fn compose_helpers() {
    assert_eq!(compose_interpolate("a/$$register"), "a/$register");
    assert_eq!(compose_interpolate("a/$register"), "a/");
    assert_eq!(compose_interpolate("${KEY:-}"), "");
    assert_eq!(compose_interpolate("${KEY:-x}y"), "xy");
    assert_eq!(compose_duration_ms("30s"), Some(30_000));
    assert_eq!(compose_duration_ms("1m30s"), Some(90_000));
    assert_eq!(compose_duration_ms("1500ms"), Some(1_500));
    assert_eq!(compose_duration_ms("soon"), None);
}

/// Replaces the first `from` (which must occur) with `to`.
fn mutate(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "mutation target {from:?} not found");
    text.replacen(from, to, 1)
}

fn assert_caught(file: &str, problems: Problems, mutation: &str, needle: &str) {
    assert!(
        problems.0.iter().any(|e| e.contains(needle)),
        "{file}: mutation {mutation:?} not caught as {needle:?}; problems: {:?}",
        problems.0
    );
}

#[test]
fn mutations_of_the_compose_file_are_caught() {
    let text = read(COMPOSE);
    // Start from files without problems, so each one below comes from its mutation.
    assert_no_problems(COMPOSE, compose_problems(&text));
    for (from, to, needle) in [
        ("hostname: svcb", "hostname: svca", "svcb: hostname"),
        ("    hostname: svca\n", "", "svca: hostname"),
        ("Service B", "Service A", "also svca's"),
        ("\"8001:8000\"", "\"8001:8001\"", "svcb: ports"),
        ("\"8000:8000\"", "\"8000:8001\"", "svca: ports"),
        (
            "SERVICEKIT_PORT: \"8000\"",
            "SERVICEKIT_PORT: \"8001\"",
            "container port",
        ),
        ("services/$$register", "services/$register", "$$register"),
        ("services/$$register", "register", "becomes"),
        (
            "condition: service_healthy",
            "condition: service_started",
            "valkey being healthy",
        ),
        (
            "orchestrator:\n        condition: service_healthy",
            "orchestrator:\n        condition: service_started",
            "orchestrator being healthy",
        ),
        (
            "stop_grace_period: 30s",
            "stop_grace_period: 10s",
            "stop_grace_period",
        ),
        (
            "      VALKEY_URL:",
            "      VALKEY_ADDR:",
            "reads no VALKEY_ADDR",
        ),
        (
            "http://orchestrator:9000\n",
            "orchestrator:9000\n",
            "rejects",
        ),
        (
            "SERVICE_DISPLAY_NAME: Service A",
            "SERVICE_NAME: Service A",
            "reads no SERVICE_NAME",
        ),
        (
            "\"http://127.0.0.1:8000/health\"",
            "\"http://127.0.0.1:9000/health\"",
            "own port",
        ),
        ("\"valkey-cli\", \"ping\"", "\"true\"", "valkey-cli ping"),
        (
            "\"/usr/local/bin/orchestrator\", \"healthcheck\"]",
            "\"true\"]",
            "orchestrator: healthcheck",
        ),
        (
            "entrypoint: [\"/usr/local/bin/service\"]",
            "entrypoint: [\"/usr/local/bin/svc\"]",
            "entrypoint",
        ),
        ("context: ..", "context: .", "Dockerfile"),
    ] {
        let mutated = mutate(&text, from, to);
        assert_caught(COMPOSE, compose_problems(&mutated), from, needle);
    }
}

#[test]
fn mutations_of_the_dockerfile_are_caught() {
    let text = read("Dockerfile");
    assert_no_problems("Dockerfile", dockerfile_problems(&text));
    for (from, to, needle) in [
        ("USER 10001:10001", "USER root", "non-root"),
        ("USER 10001:10001", "USER 0", "non-root"),
        (
            "ENTRYPOINT [\"/usr/local/bin/orchestrator\"]",
            "ENTRYPOINT [\"/usr/local/bin/service\"]",
            "ENTRYPOINT",
        ),
        (
            "CMD [\"/usr/local/bin/orchestrator\", \"healthcheck\"]",
            "CMD curl -f http://127.0.0.1:9000/health",
            "HEALTHCHECK",
        ),
        (
            "/out/service /usr/local/bin/service",
            "/out/service /usr/local/bin/svc",
            "/usr/local/bin/service",
        ),
        ("--example service", "--example demo", "--example service"),
        (
            "FROM debian:bookworm-slim",
            "FROM debian:trixie-slim",
            "bookworm-slim",
        ),
        ("EXPOSE 9000 8000", "EXPOSE 9000", "8000"),
        ("ARG RUST_VERSION=1.95", "ARG RUST_VERSION=1.70", "older"),
    ] {
        let mutated = mutate(&text, from, to);
        assert_caught("Dockerfile", dockerfile_problems(&mutated), from, needle);
    }
    let ignore = read(".dockerignore");
    assert_caught(
        ".dockerignore",
        dockerignore_problems(&mutate(&ignore, "target/\n", "\n")),
        "target",
        "target",
    );
    assert_caught(
        ".dockerignore",
        dockerignore_problems(&format!("{ignore}\nbenches/\n")),
        "benches",
        "benches",
    );
}

#[test]
fn mutations_of_the_kubernetes_manifests_are_caught() {
    let texts = k8s_texts();
    assert_no_problems("compose/k8s", k8s_problems(&texts));
    let service = K8S
        .iter()
        .position(|f| f.ends_with("service.yaml"))
        .unwrap();
    let orchestrator = K8S
        .iter()
        .position(|f| f.ends_with("orchestrator.yaml"))
        .unwrap();
    let valkey = K8S.iter().position(|f| f.ends_with("valkey.yaml")).unwrap();
    for (file, from, to, needle) in [
        (
            service,
            "fieldPath: status.podIP",
            "fieldPath: metadata.name",
            "pod IP",
        ),
        (
            service,
            "services/$register",
            "services/$$register",
            "no $$",
        ),
        (
            service,
            "value: \"8000\"",
            "value: \"8001\"",
            "SERVICEKIT_PORT",
        ),
        (service, "path: /health", "path: /", "readinessProbe"),
        (
            service,
            "command: [\"sleep\", \"5\"]",
            "command: [\"sleep\", \"25\"]",
            "terminationGracePeriodSeconds",
        ),
        (
            service,
            "terminationGracePeriodSeconds: 30",
            "terminationGracePeriodSeconds: 15",
            "terminationGracePeriodSeconds",
        ),
        (service, "preStop:", "postStart:", "preStop"),
        (service, "runAsUser: 10001", "runAsUser: 0", "runAsUser"),
        (
            service,
            "app.kubernetes.io/name: svca\n  ports:",
            "app.kubernetes.io/name: svcb\n  ports:",
            "select",
        ),
        (
            orchestrator,
            "path: /health",
            "path: /healthz",
            "readinessProbe",
        ),
        (
            orchestrator,
            "value: redis://valkey:6379",
            "value: redis://redis:6379",
            "VALKEY_URL",
        ),
        (
            orchestrator,
            "name: LOG_FORMAT",
            "name: LOG_LEVEL",
            "reads no LOG_LEVEL",
        ),
        (orchestrator, "value: json", "value: xml", "rejects"),
        (valkey, "port: 6379", "port: 6380", "6379"),
    ] {
        let mut mutated = texts.clone();
        mutated[file] = mutate(&texts[file], from, to);
        assert_caught(K8S[file], k8s_problems(&mutated), from, needle);
    }
}
