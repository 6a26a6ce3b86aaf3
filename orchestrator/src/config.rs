//! How the orchestrator is configured: flags, each with an environment fallback.
//!
//! The same struct is parsed by the binary and built directly by tests, so what `--help`
//! documents is exactly what the server reads.

use crate::redact;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use url::Url;

/// The command line of the `orchestrator` binary: the server's flags, and optionally a
/// subcommand. Without one it serves, exactly as configured by [`Config`].
#[derive(Debug, Clone, Parser)]
#[command(name = "orchestrator", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What the binary does instead of serving.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Check a running orchestrator's /health: exit 0 when healthy, 1 otherwise.
    ///
    /// GETs the URL once and exits 0 when it answers 200 with "status":"healthy", 1 otherwise,
    /// printing one line that says why. For a container HEALTHCHECK: the image needs no curl.
    Healthcheck(HealthcheckArgs),
}

/// Flags of `orchestrator healthcheck`.
#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// URL to GET. Default: /health on the port of --bind (ORCHESTRATOR_BIND), on 127.0.0.1
    /// when it binds all interfaces, e.g. http://127.0.0.1:9000/health.
    #[arg(long, env = "ORCHESTRATOR_HEALTHCHECK_URL", value_parser = parse_healthcheck_url)]
    pub url: Option<String>,

    /// Seconds to wait for the whole answer before reporting unhealthy.
    #[arg(long, default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub timeout_seconds: u64,
}

impl HealthcheckArgs {
    /// The URL to check: `--url`, else `/health` on the address the server binds.
    pub fn target(&self, bind: SocketAddr) -> Result<String, String> {
        if let Some(url) = &self.url {
            return Ok(url.clone());
        }
        if bind.port() == 0 {
            return Err(format!(
                "cannot derive the health URL from bind address {bind} (port 0): pass --url"
            ));
        }
        // A wildcard bind is reachable on loopback; a specific address only on itself.
        let ip = match bind.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Ok(format!(
            "http://{}/health",
            SocketAddr::new(ip, bind.port())
        ))
    }

    /// How long the check may take.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_seconds)
    }
}

/// The servicekit orchestrator: a service registry with TTL expiry.
///
/// Its `Debug` redacts the registration key and the password in the Valkey URL, and `--help`
/// never prints their environment values.
#[derive(Clone, Parser)]
#[command(name = "orchestrator", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on (HTTP/1.1 and HTTP/2; cleartext unless --tls-cert is set).
    #[arg(long, env = "ORCHESTRATOR_BIND", default_value = "0.0.0.0:9000")]
    pub bind: SocketAddr,

    /// Valkey URL (redis://host:port/db, valkey://..., redis-cluster://host:port). When unset,
    /// registrations are kept in this process's memory and lost when it exits.
    // The value may hold a password: --help must not print it.
    #[arg(long, env = "VALKEY_URL", hide_env_values = true)]
    pub valkey_url: Option<String>,

    /// Prefix of every Valkey key, so several registries can share one Valkey.
    #[arg(long, env = "ORCHESTRATOR_KEY_PREFIX", default_value = "servicekit:")]
    pub key_prefix: String,

    /// Seconds a registration lives after its last registration or ping.
    #[arg(long, env = "ORCHESTRATOR_TTL_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub ttl_seconds: u64,

    /// Base URL under which clients reach this orchestrator (for `ping_url` and `Location`),
    /// e.g. http://orchestrator:9000. When unset, it is built from each request's Host header,
    /// which is wrong behind a proxy that rewrites Host: set it there.
    #[arg(long, env = "ORCHESTRATOR_PUBLIC_URL", value_parser = parse_public_url)]
    pub public_url: Option<String>,

    /// Key that every write (register, ping, deregister) must present in X-Service-Key or
    /// Authorization: Bearer. When unset or empty, writes are open.
    #[arg(long, env = "ORCHESTRATOR_REGISTRATION_KEY", hide_env_values = true)]
    pub registration_key: Option<String>,

    /// PEM file with the certificate chain to serve HTTPS with (leaf first). Together with
    /// --tls-key the orchestrator serves TLS only (HTTP/2 and HTTP/1.1 through ALPN); neither:
    /// cleartext.
    #[arg(long, env = "ORCHESTRATOR_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM file with the private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "ORCHESTRATOR_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Key that may do any write, leased entries included, presented in X-Admin-Key (it also
    /// stands in for the registration key). When unset or empty, there is no admin.
    #[arg(long, env = "ORCHESTRATOR_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,

    /// Refuse registrations that do not ask for a lease ("lease": true) with 400. Clients
    /// without leases (the reference Python client) cannot register then. The environment
    /// variable takes true/false, 1/0, yes/no, on/off.
    #[arg(long, env = "ORCHESTRATOR_REQUIRE_LEASE", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub require_lease: bool,

    /// Most connections served at once; further clients wait in the listen backlog. Lowered
    /// at start (with a warning) when the open-file limit cannot hold it.
    #[arg(long, env = "ORCHESTRATOR_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Most connections served at once from one peer IP address; 0: no per-peer limit. Behind
    /// a proxy or load balancer every client has the proxy's address: leave it off there.
    #[arg(long, env = "ORCHESTRATOR_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: u32,

    /// Seconds a new connection has to deliver its first complete request head (HTTP/1 or
    /// HTTP/2, the protocol detection included); for HTTP/1 also how long a kept-alive
    /// connection may wait for its next request. Then it is closed.
    #[arg(long, env = "ORCHESTRATOR_HEADER_TIMEOUT_SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub header_timeout_seconds: u64,

    /// Seconds a connection may stay open with no request in flight before it is closed
    /// (HTTP/2 with GOAWAY; HTTP/1 normally goes sooner, by the header timeout).
    #[arg(long, env = "ORCHESTRATOR_IDLE_TIMEOUT_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idle_timeout_seconds: u64,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "ORCHESTRATOR_MAX_BODY_BYTES", default_value_t = 65_536)]
    pub max_body_bytes: usize,

    /// Most registrations held at once: a new URL beyond it is refused with 507 (renewals of
    /// registered URLs always pass). Soft: concurrent registrations may overshoot it, and
    /// entries expired but not yet swept still count (see the README).
    #[arg(long, env = "ORCHESTRATOR_MAX_REGISTRATIONS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_registrations: u64,

    /// Largest `info` of a registration, in bytes of JSON; a larger one is refused with 413.
    #[arg(long, env = "ORCHESTRATOR_MAX_INFO_BYTES", default_value_t = 16_384,
          value_parser = clap::value_parser!(u64).range(2..))]
    pub max_info_bytes: u64,

    /// Most watch feeds (GET /services?watch=true) open at once; beyond it a watcher gets 429
    /// with Retry-After. Each takes a connection too (see --max-connections).
    #[arg(long, env = "ORCHESTRATOR_MAX_WATCHERS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_watchers: u32,

    /// Most health check probes (pull checks, see the README's "Health") this replica runs at
    /// once; further due checks wait for a slot.
    #[arg(long, env = "ORCHESTRATOR_CHECK_CONCURRENCY",
          default_value_t = crate::checks::DEFAULT_CHECK_CONCURRENCY,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub check_concurrency: u32,

    /// Seconds a checker replica counts as alive after it last announced itself in the store
    /// (it announces every third of this). Replicas on one Valkey share the checks; when one
    /// dies, the others take its instances over within about this plus a third of it, so keep
    /// it well under the shortest check interval.
    #[arg(long, env = "ORCHESTRATOR_CHECKER_TTL_SECONDS",
          default_value_t = crate::checks::DEFAULT_CHECKER_TTL_SECONDS,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub checker_ttl_seconds: u64,

    /// Log output: human-readable or one JSON object per line.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    /// The watch feed's heartbeat, send timeout and buffers: not flags, set by tests.
    #[arg(skip)]
    pub watch_tuning: crate::watch::WatchTuning,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("bind", &self.bind)
            .field("valkey_url", &self.valkey_url.as_deref().map(redact::url))
            .field("key_prefix", &self.key_prefix)
            .field("ttl_seconds", &self.ttl_seconds)
            .field("public_url", &self.public_url.as_deref().map(redact::url))
            .field(
                "registration_key",
                &self.registration_key.as_ref().map(|_| redact::REDACTED),
            )
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field(
                "admin_key",
                &self.admin_key.as_ref().map(|_| redact::REDACTED),
            )
            .field("require_lease", &self.require_lease)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_ip", &self.max_connections_per_ip)
            .field("header_timeout_seconds", &self.header_timeout_seconds)
            .field("idle_timeout_seconds", &self.idle_timeout_seconds)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_registrations", &self.max_registrations)
            .field("max_info_bytes", &self.max_info_bytes)
            .field("max_watchers", &self.max_watchers)
            .field("check_concurrency", &self.check_concurrency)
            .field("checker_ttl_seconds", &self.checker_ttl_seconds)
            .field("log_format", &self.log_format)
            .field("watch_tuning", &self.watch_tuning)
            .finish()
    }
}

impl Config {
    /// `text` (an error message, say) with every secret of this configuration replaced by
    /// `***`: the registration key, and the Valkey password as written and decoded. For text
    /// that comes from elsewhere (a client library's error) and may quote them.
    pub fn redact_secrets(&self, text: &str) -> String {
        let mut secrets: Vec<String> = Vec::new();
        if let Some(key) = self.required_key() {
            secrets.push(key.to_owned());
        }
        if let Some(key) = self.admin_key.as_deref().filter(|k| !k.is_empty()) {
            secrets.push(key.to_owned());
        }
        if let Some(url) = &self.valkey_url {
            if let Some(range) = redact::password_range(url) {
                let raw = &url[range];
                secrets.push(raw.to_owned());
                secrets.push(redact::percent_decoded(raw));
            }
        }
        // Longest first, so a secret that contains another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let mut text = text.to_owned();
        for secret in secrets.iter().filter(|s| !s.is_empty()) {
            text = text.replace(secret.as_str(), redact::REDACTED);
        }
        text
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

impl Config {
    /// Defaults for an in-process server: loopback on a free port, in-memory store.
    pub fn for_tests() -> Self {
        Config {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            valkey_url: None,
            key_prefix: "servicekit:".into(),
            ttl_seconds: 30,
            public_url: None,
            registration_key: None,
            tls_cert: None,
            tls_key: None,
            admin_key: None,
            require_lease: false,
            max_connections: 10_000,
            max_connections_per_ip: 0,
            header_timeout_seconds: 5,
            idle_timeout_seconds: 30,
            max_body_bytes: 65_536,
            max_registrations: 100_000,
            max_info_bytes: 16_384,
            max_watchers: 10_000,
            check_concurrency: crate::checks::DEFAULT_CHECK_CONCURRENCY,
            checker_ttl_seconds: crate::checks::DEFAULT_CHECKER_TTL_SECONDS,
            log_format: LogFormat::Pretty,
            watch_tuning: crate::watch::WatchTuning::default(),
        }
    }

    /// The registration key, if one is required. An empty value (as `${KEY:-}` in a compose
    /// file gives) means none: requiring the empty string would only confuse clients.
    pub fn required_key(&self) -> Option<&str> {
        self.registration_key.as_deref().filter(|k| !k.is_empty())
    }

    /// The entry time-to-live.
    /// The limits the API enforces (`--max-registrations`, `--max-info-bytes`).
    pub fn limits(&self) -> crate::api::Limits {
        crate::api::Limits {
            max_registrations: usize::try_from(self.max_registrations).unwrap_or(usize::MAX),
            max_info_bytes: usize::try_from(self.max_info_bytes).unwrap_or(usize::MAX),
        }
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_seconds)
    }

    /// How long a checker replica counts as alive after announcing itself.
    pub fn checker_ttl(&self) -> Duration {
        Duration::from_secs(self.checker_ttl_seconds)
    }

    /// How long a request head may take to arrive (see `--header-timeout-seconds`).
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_seconds)
    }

    /// How long a connection may sit with no request in flight.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_seconds)
    }
}

/// Accepts an absolute http URL with a host (the check has no TLS).
fn parse_healthcheck_url(s: &str) -> Result<String, String> {
    let url = Url::parse(s).map_err(|e| format!("not an absolute URL: {e}"))?;
    if url.scheme() != "http" || url.host_str().is_none() {
        return Err("must be an http URL with a host".into());
    }
    Ok(s.to_owned())
}

/// Accepts an absolute http(s) URL and drops a trailing slash, so paths can be appended.
fn parse_public_url(s: &str) -> Result<String, String> {
    let url = Url::parse(s).map_err(|e| format!("not an absolute URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("must be an http or https URL with a host".into());
    }
    Ok(s.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_validate() {
        let c = Config::try_parse_from([
            "orchestrator",
            "--ttl-seconds",
            "5",
            "--public-url",
            "http://orch:9000/",
        ])
        .unwrap();
        assert_eq!(c.ttl(), Duration::from_secs(5));
        assert_eq!(c.public_url.as_deref(), Some("http://orch:9000"));
        assert!(Config::try_parse_from(["orchestrator", "--ttl-seconds", "0"]).is_err());
        assert!(Config::try_parse_from(["orchestrator", "--public-url", "ftp://x"]).is_err());
        assert!(Config::try_parse_from(["orchestrator", "--bind", "nope"]).is_err());
        assert!(!c.require_lease);
        let leased = Config::try_parse_from(["orchestrator", "--require-lease"]).unwrap();
        assert!(leased.require_lease);
        let c = Config::try_parse_from([
            "orchestrator",
            "--max-registrations",
            "7",
            "--max-info-bytes",
            "100",
        ])
        .unwrap();
        assert_eq!(c.limits().max_registrations, 7);
        assert_eq!(c.limits().max_info_bytes, 100);
        let defaults = Config::try_parse_from(["orchestrator"]).unwrap();
        assert_eq!(defaults.limits(), crate::api::Limits::default());
        assert!(Config::try_parse_from(["orchestrator", "--max-registrations", "0"]).is_err());
        assert_eq!(
            (defaults.check_concurrency, defaults.checker_ttl()),
            (64, Duration::from_secs(3))
        );
        let c = Config::try_parse_from([
            "orchestrator",
            "--check-concurrency",
            "8",
            "--checker-ttl-seconds",
            "1",
        ])
        .unwrap();
        assert_eq!((c.check_concurrency, c.checker_ttl_seconds), (8, 1));
        assert!(Config::try_parse_from(["orchestrator", "--check-concurrency", "0"]).is_err());
        assert!(Config::try_parse_from(["orchestrator", "--checker-ttl-seconds", "0"]).is_err());
    }

    #[test]
    fn debug_shows_no_secret() {
        let mut config = Config::for_tests();
        config.valkey_url = Some("redis://admin:hunter2-valkey@valkey:6379/0".into());
        config.registration_key = Some("hunter2-key".into());
        config.admin_key = Some("hunter2-admin".into());
        for text in [
            format!("{config:?}"),
            format!("{config:#?}"),
            format!(
                "{:?}",
                Cli {
                    config: config.clone(),
                    command: None
                }
            ),
        ] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("redis://admin:***@valkey:6379/0"), "{text}");
        }
        assert!(format!("{config:?}").contains("registration_key: Some(\"***\")"));
        assert!(format!("{config:?}").contains("admin_key: Some(\"***\")"));
        config.registration_key = None;
        assert!(format!("{config:?}").contains("registration_key: None"));
    }

    #[test]
    fn secrets_are_redacted_from_other_text() {
        let mut config = Config::for_tests();
        config.valkey_url = Some("redis://:hunter%402@valkey:6379".into());
        config.registration_key = Some("k3y-hunter".into());
        let text = "cannot use redis://:hunter%402@valkey:6379 (password hunter@2), key k3y-hunter";
        assert_eq!(
            config.redact_secrets(text),
            "cannot use redis://:***@valkey:6379 (password ***), key ***"
        );
        assert_eq!(Config::for_tests().redact_secrets(text), text);
    }

    fn healthcheck(args: &[&str]) -> (Config, HealthcheckArgs) {
        let cli = Cli::try_parse_from(args).unwrap();
        match cli.command {
            Some(Command::Healthcheck(h)) => (cli.config, h),
            None => panic!("no healthcheck subcommand in {args:?}"),
        }
    }

    #[test]
    fn no_subcommand_serves_with_the_same_flags() {
        let cli = Cli::try_parse_from(["orchestrator", "--ttl-seconds", "5"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.config.ttl(), Duration::from_secs(5));
        assert!(Cli::try_parse_from(["orchestrator", "--ttl-seconds", "0"]).is_err());
        assert!(Cli::try_parse_from(["orchestrator", "nonsense"]).is_err());
    }

    #[test]
    fn healthcheck_url_defaults_to_the_bind_port_on_loopback() {
        let (config, h) = healthcheck(&["orchestrator", "healthcheck"]);
        assert_eq!(h.timeout(), Duration::from_secs(3));
        assert_eq!(
            h.target(config.bind).unwrap(),
            "http://127.0.0.1:9000/health"
        );
        let (config, h) = healthcheck(&["orchestrator", "--bind", "0.0.0.0:9100", "healthcheck"]);
        assert_eq!(
            h.target(config.bind).unwrap(),
            "http://127.0.0.1:9100/health"
        );
        let (config, h) = healthcheck(&["orchestrator", "--bind", "[::]:9200", "healthcheck"]);
        assert_eq!(h.target(config.bind).unwrap(), "http://[::1]:9200/health");
        let (config, h) = healthcheck(&["orchestrator", "--bind", "10.1.2.3:9300", "healthcheck"]);
        assert_eq!(
            h.target(config.bind).unwrap(),
            "http://10.1.2.3:9300/health"
        );
        let (config, h) = healthcheck(&["orchestrator", "--bind", "127.0.0.1:0", "healthcheck"]);
        assert!(h.target(config.bind).unwrap_err().contains("--url"));
    }

    #[test]
    fn healthcheck_flags_parse_and_validate() {
        let (config, h) = healthcheck(&[
            "orchestrator",
            "healthcheck",
            "--url",
            "http://orch:9000/health",
            "--timeout-seconds",
            "1",
        ]);
        assert_eq!(h.target(config.bind).unwrap(), "http://orch:9000/health");
        assert_eq!(h.timeout(), Duration::from_secs(1));
        for bad in [
            vec![
                "orchestrator",
                "healthcheck",
                "--url",
                "https://orch/health",
            ],
            vec!["orchestrator", "healthcheck", "--url", "/health"],
            vec!["orchestrator", "healthcheck", "--timeout-seconds", "0"],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?} accepted");
        }
    }
}
