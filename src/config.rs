//! What a service needs to know to register: where the orchestrator is, under which URL the
//! service answers, and how persistent to be.
//!
//! Options come from the builder first and the environment second, with the reference
//! library's names and defaults. Resolution happens once, up front, so every mistake is one
//! [`ConfigError`] naming the variable and the bad value instead of a failure deep inside a
//! retry loop.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use http::Uri;
use serde::Serialize;
use serde_json::Value;

use crate::protocol::{CheckSpec, ServiceInfo, REGISTER_PATH};

mod check;
pub use check::{
    CHECK_DEREGISTER_ENV, CHECK_GRPC_ENV, CHECK_HTTP_ENV, CHECK_INTERVAL_ENV, CHECK_TCP_ENV,
    CHECK_TIMEOUT_ENV,
};

/// Default name of the variable holding the orchestrator's URL (its base URL, or the full
/// registration endpoint).
pub const ORCHESTRATOR_URL_ENV: &str = "SERVICEKIT_ORCHESTRATOR_URL";
/// Default name of the variable overriding the advertised host.
pub const HOST_ENV: &str = "SERVICEKIT_HOST";
/// Default name of the variable holding the advertised (and probed) port.
pub const PORT_ENV: &str = "SERVICEKIT_PORT";
/// Name of the variable holding the registration key, sent as `X-Service-Key`.
pub const REGISTRATION_KEY_ENV: &str = "SERVICEKIT_REGISTRATION_KEY";
/// Name of the variable overriding the registered `display_name`.
pub const DISPLAY_NAME_ENV: &str = "SERVICEKIT_DISPLAY_NAME";
/// Port used when neither the builder nor the environment names one.
pub const DEFAULT_PORT: u16 = 8000;
/// The longest duration any option takes.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// A configuration mistake, reported with the source of the bad value. Secrets are never
/// part of the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No orchestrator URL was given.
    #[error("no orchestrator URL: set {var} (e.g. http://orchestrator:9000) or call .orchestrator_url(...)")]
    MissingOrchestratorUrl {
        /// The variable that was read.
        var: String,
    },
    /// The orchestrator URL is not usable.
    #[error("invalid orchestrator URL {value:?} from {origin}: {reason}")]
    InvalidOrchestratorUrl {
        /// The value, with any password replaced by `***`.
        value: String,
        /// Where it came from (`parameter` or `env:VAR`).
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The orchestrator URL is `https`, and this build of servicekit has no TLS: its `tls`
    /// feature is off.
    #[error("orchestrator URL {value:?} from {origin} is https, but servicekit was built without TLS: enable its `tls` feature (servicekit = {{ features = [\"tls\"] }}) or use an http URL")]
    TlsNotEnabled {
        /// The value, with any password replaced by `***`.
        value: String,
        /// Where it came from (`parameter` or `env:VAR`).
        origin: String,
    },
    /// The port is not a number from 1 to 65535.
    #[error("invalid port {value:?} from {origin}: expected a number from 1 to 65535")]
    InvalidPort {
        /// The value.
        value: String,
        /// Where it came from.
        origin: String,
    },
    /// The host cannot be part of a URL.
    #[error("invalid host {value:?} from {origin}: {reason}")]
    InvalidHost {
        /// The value.
        value: String,
        /// Where it came from.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No host was given and the machine hostname could not be read.
    #[error("no host: {var} is not set and the machine hostname could not be read ({reason})")]
    NoHost {
        /// The variable that was read.
        var: String,
        /// Why the hostname could not be read.
        reason: String,
    },
    /// The service info is not a JSON object with a `display_name`.
    #[error("invalid service info: {0}")]
    InvalidInfo(String),
    /// The declared pull check (`.check(...)` or `SERVICEKIT_CHECK_*`) is not usable.
    #[error("invalid health check from {origin}: {reason}")]
    InvalidCheck {
        /// Where it came from (`parameter` or `env:VAR`).
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Another option has an impossible value.
    #[error("invalid option {name}: {reason}")]
    InvalidOption {
        /// The builder method's name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Where a resolved value came from, as logged in `registration.starting`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// Given to the builder.
    Parameter,
    /// Read from the named environment variable.
    Env(String),
    /// The machine hostname, or the executable's name.
    AutoDetected,
    /// The built-in default.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Parameter => f.write_str("parameter"),
            Source::Env(var) => write!(f, "env:{var}"),
            Source::AutoDetected => f.write_str("auto-detected"),
            Source::Default => f.write_str("default"),
        }
    }
}

/// The registration key. Its `Debug` never shows it (and it has no `Display`).
#[derive(Clone, PartialEq, Eq)]
pub struct RegistrationKey(String);

impl RegistrationKey {
    /// The key itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RegistrationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RegistrationKey(***)")
    }
}

/// The resolved configuration of a [`RegistrationLayer`](crate::RegistrationLayer): where to
/// register and as what. Read it with
/// [`RegistrationLayer::config`](crate::RegistrationLayer::config).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The registration endpoint, e.g. `http://orchestrator:9000/services/$register`.
    pub orchestrator_url: Uri,
    /// The URL this service registers under, e.g. `http://svca:8000`.
    pub service_url: String,
    /// The advertised host.
    pub host: String,
    /// Where [`host`](Self::host) came from.
    pub host_source: Source,
    /// The advertised port; bind [`RegistrationLayer::bind_addr`](crate::RegistrationLayer::bind_addr)
    /// to serve on it.
    pub port: u16,
    /// Where [`port`](Self::port) came from.
    pub port_source: Source,
    /// The key sent as `X-Service-Key`, if any.
    pub registration_key: Option<RegistrationKey>,
    /// What the service says about itself.
    pub info: ServiceInfo,
    /// The check the orchestrator is asked to run on this instance (sent as `check` in the
    /// registration), if any.
    pub check: Option<CheckSpec>,
    pub(crate) tunables: Tunables,
}

/// The service's own health function (the builder's `report_health`): called before each
/// keepalive ping, its answer is the ping's body.
#[derive(Clone)]
pub(crate) struct HealthFn(
    pub  std::sync::Arc<
        dyn Fn() -> std::pin::Pin<
                Box<dyn std::future::Future<Output = crate::protocol::HealthReport> + Send>,
            > + Send
            + Sync,
    >,
);

impl fmt::Debug for HealthFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HealthFn")
    }
}

/// Default of the builder's `health_timeout`.
pub(crate) const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// How persistent registration is; set through the builder.
#[derive(Debug, Clone)]
pub(crate) struct Tunables {
    pub max_attempts: u32,
    pub retry_delay: Duration,
    pub max_retry_delay: Duration,
    pub timeout: Duration,
    pub enable_keepalive: bool,
    pub keepalive_interval: Option<Duration>,
    pub auto_deregister: bool,
    pub health_path: Option<String>,
    pub startup_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub drain_delay: Duration,
    pub health: Option<HealthFn>,
    pub health_timeout: Duration,
}

impl Default for Tunables {
    /// The reference library's defaults, and a short shutdown budget.
    fn default() -> Self {
        Tunables {
            max_attempts: 5,
            retry_delay: Duration::from_secs(2),
            max_retry_delay: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            enable_keepalive: true,
            keepalive_interval: None,
            auto_deregister: true,
            health_path: None,
            startup_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(2),
            drain_delay: Duration::ZERO,
            health: None,
            health_timeout: DEFAULT_HEALTH_TIMEOUT,
        }
    }
}

impl Tunables {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::InvalidOption {
                name: "max_attempts",
                reason: "must be at least 1".into(),
            });
        }
        for (name, d) in [
            ("timeout", self.timeout),
            ("startup_timeout", self.startup_timeout),
            ("max_retry_delay", self.max_retry_delay),
            ("shutdown_timeout", self.shutdown_timeout),
            ("health_timeout", self.health_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::InvalidOption {
                    name,
                    reason: "must be positive".into(),
                });
            }
        }
        // Durations are added to instants; a day is beyond any sensible setting and keeps
        // that arithmetic far from overflowing.
        for (name, d) in [
            ("timeout", Some(self.timeout)),
            ("startup_timeout", Some(self.startup_timeout)),
            ("retry_delay", Some(self.retry_delay)),
            ("max_retry_delay", Some(self.max_retry_delay)),
            ("shutdown_timeout", Some(self.shutdown_timeout)),
            ("drain_delay", Some(self.drain_delay)),
            ("health_timeout", Some(self.health_timeout)),
            ("keepalive_interval", self.keepalive_interval),
        ] {
            if d.is_some_and(|d| d > MAX_DURATION) {
                return Err(ConfigError::InvalidOption {
                    name,
                    reason: "must be at most 24 h".into(),
                });
            }
        }
        if self.keepalive_interval.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::InvalidOption {
                name: "keepalive_interval",
                reason: "must be positive".into(),
            });
        }
        if let Some(path) = &self.health_path {
            if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
                return Err(ConfigError::InvalidOption {
                    name: "health_path",
                    reason: format!("{path:?} must be a URL path starting with '/'"),
                });
            }
        }
        Ok(())
    }
}

/// Converts any serializable info (a [`ServiceInfo`] or a struct that flattens one) into the
/// wire form, checking that it has a `display_name`.
pub(crate) fn info_from<T: Serialize>(info: &T) -> Result<ServiceInfo, ConfigError> {
    let bad = |reason: String| ConfigError::InvalidInfo(reason);
    let value = serde_json::to_value(info).map_err(|e| bad(e.to_string()))?;
    if !value.is_object() {
        return Err(bad("it must serialize to a JSON object".into()));
    }
    if !matches!(value.get("display_name"), Some(Value::String(s)) if !s.trim().is_empty()) {
        return Err(bad("it needs a non-empty string field display_name".into()));
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

/// What the builder was told, before the environment is consulted.
#[derive(Debug, Clone)]
pub(crate) struct Overrides {
    pub orchestrator_url: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub orchestrator_url_env: String,
    pub host_env: String,
    pub port_env: String,
    pub registration_key: Option<RegistrationKey>,
    pub info: Option<Result<ServiceInfo, ConfigError>>,
    pub check: Option<CheckSpec>,
}

impl Default for Overrides {
    fn default() -> Self {
        Overrides {
            orchestrator_url: None,
            host: None,
            port: None,
            orchestrator_url_env: ORCHESTRATOR_URL_ENV.into(),
            host_env: HOST_ENV.into(),
            port_env: PORT_ENV.into(),
            registration_key: None,
            info: None,
            check: None,
        }
    }
}

/// Reads a variable (`std::env::var_os` in production, a map in tests).
pub(crate) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment. A value that is not UTF-8 is read lossily, so it fails validation
/// naming its variable instead of silently counting as unset.
pub(crate) fn process_env(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

impl Overrides {
    /// The advertised port: parameter, then the port variable, then [`DEFAULT_PORT`].
    pub(crate) fn port(&self, env: Env<'_>) -> Result<(u16, Source), ConfigError> {
        match self.port {
            Some(0) => Err(ConfigError::InvalidPort {
                value: "0".into(),
                origin: Source::Parameter.to_string(),
            }),
            Some(p) => Ok((p, Source::Parameter)),
            // An empty value counts as unset, as for the host and the URL.
            None => match env(&self.port_env).filter(|v| !v.trim().is_empty()) {
                Some(text) => {
                    let source = Source::Env(self.port_env.clone());
                    match text.trim().parse::<u16>() {
                        Ok(p) if p > 0 => Ok((p, source)),
                        _ => Err(ConfigError::InvalidPort {
                            value: text,
                            origin: source.to_string(),
                        }),
                    }
                }
                None => Ok((DEFAULT_PORT, Source::Default)),
            },
        }
    }

    /// Resolves everything against an environment and the machine's hostname.
    pub(crate) fn resolve(
        &self,
        tunables: &Tunables,
        env: Env<'_>,
        hostname: &dyn Fn() -> Result<String, String>,
    ) -> Result<Config, ConfigError> {
        let (url_text, url_source) = match &self.orchestrator_url {
            Some(u) => (u.clone(), Source::Parameter),
            None => match env(&self.orchestrator_url_env).filter(|v| !v.trim().is_empty()) {
                Some(u) => (u, Source::Env(self.orchestrator_url_env.clone())),
                None => {
                    return Err(ConfigError::MissingOrchestratorUrl {
                        var: self.orchestrator_url_env.clone(),
                    })
                }
            },
        };
        let orchestrator_url = registration_endpoint(&url_text, &url_source)?;

        let (host, host_source) = match &self.host {
            Some(h) => (h.clone(), Source::Parameter),
            None => match env(&self.host_env).filter(|v| !v.trim().is_empty()) {
                Some(h) => (h.trim().to_owned(), Source::Env(self.host_env.clone())),
                None => match hostname() {
                    Ok(h) if !h.trim().is_empty() => (h.trim().to_owned(), Source::AutoDetected),
                    Ok(_) => {
                        return Err(ConfigError::NoHost {
                            var: self.host_env.clone(),
                            reason: "the hostname is empty".into(),
                        })
                    }
                    Err(reason) => {
                        return Err(ConfigError::NoHost {
                            var: self.host_env.clone(),
                            reason,
                        })
                    }
                },
            },
        };

        let (port, port_source) = self.port(env)?;
        let service_url = service_url(&host, port).map_err(|reason| ConfigError::InvalidHost {
            value: host.clone(),
            origin: host_source.to_string(),
            reason,
        })?;

        let mut info = match &self.info {
            Some(Ok(info)) => info.clone(),
            Some(Err(e)) => return Err(e.clone()),
            None => default_info(),
        };
        if let Some(name) = env(DISPLAY_NAME_ENV).filter(|v| !v.trim().is_empty()) {
            info.display_name = name.trim().to_owned();
        }

        tunables.validate()?;
        Ok(Config {
            orchestrator_url,
            service_url,
            host,
            host_source,
            port,
            port_source,
            registration_key: registration_key(self.registration_key.as_ref(), env)?,
            info,
            check: check::resolve_check(self.check.as_ref(), env)?,
            tunables: tunables.clone(),
        })
    }
}

/// The info used when the builder was given none: the executable's file name, the same
/// however the program is started. [`package_info!`](crate::package_info) gives the package
/// name and version instead.
fn default_info() -> ServiceInfo {
    let name = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .filter(|s| !s.is_empty());
    ServiceInfo::new(name.unwrap_or_else(|| "service".into()))
}

/// The registration key: parameter, else `SERVICEKIT_REGISTRATION_KEY`. A trailing newline
/// (as secret files often have) is dropped; anything else that cannot travel in an HTTP header
/// is an error naming the source, never the secret itself.
fn registration_key(
    param: Option<&RegistrationKey>,
    env: Env<'_>,
) -> Result<Option<RegistrationKey>, ConfigError> {
    let (key, origin) = match param {
        Some(k) => (k.0.clone(), Source::Parameter),
        None => match env(REGISTRATION_KEY_ENV) {
            Some(k) => (k, Source::Env(REGISTRATION_KEY_ENV.into())),
            None => return Ok(None),
        },
    };
    let key = key.trim_end_matches(['\r', '\n']).to_owned();
    if key.is_empty() {
        return Ok(None);
    }
    if http::HeaderValue::from_str(&key).is_err() {
        return Err(ConfigError::InvalidOption {
            name: "registration_key",
            reason: format!(
                "the key from {origin} contains characters not allowed in an HTTP header"
            ),
        });
    }
    Ok(Some(RegistrationKey(key)))
}

impl From<String> for RegistrationKey {
    fn from(key: String) -> Self {
        RegistrationKey(key)
    }
}

/// The registration endpoint from the orchestrator URL the user gave: its base URL
/// (`http://orchestrator:9000`, optionally with a path prefix) gets `/services/$register`
/// appended; the full endpoint is kept as it is.
fn registration_endpoint(text: &str, source: &Source) -> Result<Uri, ConfigError> {
    let bad = |reason: &str| ConfigError::InvalidOrchestratorUrl {
        value: crate::redact::url(text.trim()),
        origin: source.to_string(),
        reason: reason.to_owned(),
    };
    let uri: Uri = text
        .trim()
        .parse()
        .map_err(|e| bad(&format!("not a URL ({e})")))?;
    let scheme = match uri.scheme_str() {
        Some("http") => "http",
        Some("https") if cfg!(feature = "tls") => "https",
        Some("https") => {
            return Err(ConfigError::TlsNotEnabled {
                value: crate::redact::url(text.trim()),
                origin: source.to_string(),
            })
        }
        Some(_) => return Err(bad("the scheme must be http or https")),
        None => return Err(bad("it must be absolute, e.g. http://orchestrator:9000")),
    };
    let Some(authority) = uri.authority() else {
        return Err(bad("it has no host"));
    };
    if authority.host().is_empty() {
        return Err(bad("it has no host"));
    }
    let before_query = text.split(['?', '#']).next().unwrap_or_default();
    if before_query.contains('@') {
        return Err(bad(&format!(
            "it contains credentials; give the key with {REGISTRATION_KEY_ENV} instead"
        )));
    }
    if authority.port().is_some() && authority.port_u16().is_none() {
        return Err(bad("its port is not a number"));
    }
    if uri.query().is_some() {
        return Err(bad("it may not have a query"));
    }
    let trimmed = uri.path().trim_end_matches('/');
    let path = if trimmed.ends_with(REGISTER_PATH) || trimmed.ends_with("/services/%24register") {
        trimmed.to_owned()
    } else {
        // A base URL (perhaps with a path prefix), or `…/services`: what a shell leaves of
        // `…/services/$register` in double quotes.
        let base = trimmed.strip_suffix("/services").unwrap_or(trimmed);
        format!("{base}{REGISTER_PATH}")
    };
    Uri::builder()
        .scheme(scheme)
        .authority(authority.clone())
        .path_and_query(path)
        .build()
        .map_err(|e| bad(&e.to_string()))
}

/// The orchestrator's base URL (`http://orchestrator:9000`, with its path prefix if any, no
/// trailing slash) from what the user gave: a base URL or the registration endpoint, by the same
/// rules as [`registration_endpoint`]. The watch feed and the list live under it.
#[cfg(feature = "discovery")]
pub(crate) fn orchestrator_base(text: &str, source: &Source) -> Result<String, ConfigError> {
    let register = registration_endpoint(text, source)?.to_string();
    Ok(register
        .strip_suffix(REGISTER_PATH)
        .or_else(|| register.strip_suffix("/services/%24register"))
        .unwrap_or(&register)
        .to_owned())
}

/// `http://host:port`, with IPv6 addresses in brackets.
fn service_url(host: &str, port: u16) -> Result<String, String> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let authority = match bare.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        Ok(IpAddr::V4(v4)) => format!("{v4}:{port}"),
        Err(_) => {
            if host.is_empty()
                || host.contains(|c: char| c.is_whitespace() || "/?#@[]:%\\".contains(c))
            {
                return Err(
                    "a host name may not contain spaces or any of / ? # @ [ ] : % \\".into(),
                );
            }
            format!("{host}:{port}")
        }
    };
    let text = format!("http://{authority}");
    text.parse::<Uri>().map_err(|e| e.to_string())?;
    Ok(text)
}

/// The port a service should listen on, by the same rules the layer advertises it with:
/// `SERVICEKIT_PORT`, else 8000. [`RegistrationLayer::bind_addr`](crate::RegistrationLayer::bind_addr)
/// gives the same port as an address to bind.
pub fn port_from_env() -> Result<u16, ConfigError> {
    Overrides::default().port(&process_env).map(|(p, _)| p)
}

/// The address to bind a server on so that it serves the advertised port on every interface.
pub(crate) fn bind_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
}

/// The machine hostname.
pub(crate) fn machine_hostname() -> Result<String, String> {
    gethostname::gethostname()
        .into_string()
        .map_err(|_| "the hostname is not valid UTF-8".to_owned())
}

#[cfg(test)]
mod tests;
