//! What a service needs to know to register: where the orchestrator is, under which URL the
//! service answers, and how persistent to be.
//!
//! Options come from the builder first and the environment second, with the reference
//! library's names and defaults. Resolution happens once, up front, so every mistake is one
//! [`ConfigError`] naming the variable and the bad value instead of a failure deep inside a
//! retry loop.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use url::Url;

use crate::protocol::ServiceInfo;

/// Default name of the variable holding the orchestrator's registration URL.
pub const ORCHESTRATOR_URL_ENV: &str = "SERVICEKIT_ORCHESTRATOR_URL";
/// Default name of the variable overriding the advertised host.
pub const HOST_ENV: &str = "SERVICEKIT_HOST";
/// Default name of the variable holding the advertised (and probed) port.
pub const PORT_ENV: &str = "SERVICEKIT_PORT";
/// Name of the variable holding the registration key, sent as `X-Service-Key`.
pub const REGISTRATION_KEY_ENV: &str = "SERVICEKIT_REGISTRATION_KEY";
/// Port used when neither the builder nor the environment names one.
pub const DEFAULT_PORT: u16 = 8000;

/// A configuration mistake, reported with the source of the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("no orchestrator URL: set {var} (e.g. http://orchestrator:9000/services/$register) or call .orchestrator_url(...)")]
    MissingOrchestratorUrl { var: String },
    #[error("invalid orchestrator URL {value:?} from {origin}: {reason}")]
    InvalidOrchestratorUrl {
        value: String,
        origin: String,
        reason: String,
    },
    #[error("invalid port {value:?} from {origin}: expected a number from 1 to 65535")]
    InvalidPort { value: String, origin: String },
    #[error("invalid host {value:?} from {origin}: {reason}")]
    InvalidHost {
        value: String,
        origin: String,
        reason: String,
    },
    #[error("no host: {var} is not set and the machine hostname could not be read ({reason})")]
    NoHost { var: String, reason: String },
    #[error("invalid service info: {0}")]
    InvalidInfo(String),
    #[error("invalid option {name}: {reason}")]
    InvalidOption { name: &'static str, reason: String },
}

/// Where a resolved value came from, as logged in `registration.starting`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Given to the builder.
    Parameter,
    /// Read from the named environment variable.
    Env(String),
    /// The machine hostname.
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

/// Everything the registration task needs, fully resolved and validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The registration endpoint, e.g. `http://orchestrator:9000/services/$register`.
    pub orchestrator_url: Url,
    /// The URL this service registers under, e.g. `http://svca:8000`.
    pub service_url: String,
    pub host: String,
    pub host_source: Source,
    pub port: u16,
    pub port_source: Source,
    pub registration_key: Option<String>,
    pub info: ServiceInfo,
    pub behaviour: Behaviour,
}

/// How persistent registration is: the options that need no resolving, shared as they are
/// by the builder and the resolved [`Settings`].
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Total registration attempts before giving up (or falling back to background retries).
    pub max_retries: u32,
    /// Base of the exponential backoff.
    pub retry_delay: Duration,
    /// Cap of the backoff, and the interval of background retries after `max_retries`.
    pub max_retry_delay: Duration,
    /// Stop the server when registration fails for good.
    pub fail_on_error: bool,
    /// Bound of every orchestrator call.
    pub timeout: Duration,
    pub enable_keepalive: bool,
    /// Fixed ping interval; `None`: a third of the TTL the orchestrator announces.
    pub keepalive_interval: Option<Duration>,
    pub auto_deregister: bool,
    /// HTTP path probed for readiness before registering; `None`: a TCP connect suffices.
    pub health_path: Option<String>,
    /// How long to wait for the local server to answer before giving up.
    pub startup_timeout: Duration,
    /// Pause between deregistration and the start of draining.
    pub drain_delay: Duration,
}

/// Builder-side options, before the environment is consulted.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub orchestrator_url: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub orchestrator_url_env: String,
    pub host_env: String,
    pub port_env: String,
    pub registration_key: Option<String>,
    pub info: Option<Result<ServiceInfo, String>>,
    pub behaviour: Behaviour,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            orchestrator_url: None,
            host: None,
            port: None,
            orchestrator_url_env: ORCHESTRATOR_URL_ENV.into(),
            host_env: HOST_ENV.into(),
            port_env: PORT_ENV.into(),
            registration_key: None,
            info: None,
            behaviour: Behaviour::default(),
        }
    }
}

impl Default for Behaviour {
    /// The reference library's defaults.
    fn default() -> Self {
        Behaviour {
            max_retries: 5,
            retry_delay: Duration::from_secs(2),
            max_retry_delay: Duration::from_secs(30),
            fail_on_error: false,
            timeout: Duration::from_secs(10),
            enable_keepalive: true,
            keepalive_interval: None,
            auto_deregister: true,
            health_path: None,
            startup_timeout: Duration::from_secs(60),
            drain_delay: Duration::ZERO,
        }
    }
}

impl Behaviour {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_retries == 0 {
            return Err(ConfigError::InvalidOption {
                name: "max_retries",
                reason: "must be at least 1 (it counts attempts, not retries)".into(),
            });
        }
        for (name, d) in [
            ("timeout", self.timeout),
            ("startup_timeout", self.startup_timeout),
            ("max_retry_delay", self.max_retry_delay),
        ] {
            if d.is_zero() {
                return Err(ConfigError::InvalidOption {
                    name,
                    reason: "must be positive".into(),
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
            if !path.starts_with('/') {
                return Err(ConfigError::InvalidOption {
                    name: "health_path",
                    reason: format!("{path:?} must start with '/'"),
                });
            }
        }
        Ok(())
    }
}

/// Converts any serializable info (a [`ServiceInfo`] or a struct that flattens one) into the
/// wire form, checking that it has a `display_name`.
pub(crate) fn info_from<T: Serialize>(info: &T) -> Result<ServiceInfo, String> {
    let value = serde_json::to_value(info).map_err(|e| e.to_string())?;
    if !value.is_object() {
        return Err("it must serialize to a JSON object".into());
    }
    if !matches!(value.get("display_name"), Some(Value::String(s)) if !s.trim().is_empty()) {
        return Err("it needs a non-empty string field display_name".into());
    }
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// The info used when the builder was given none: the running program's Cargo package name
/// and version when `cargo run` set them, else the executable's file name.
fn default_info(env: &dyn Fn(&str) -> Option<String>) -> ServiceInfo {
    let name = env("CARGO_PKG_NAME").filter(|s| !s.is_empty()).or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
    });
    let mut info = ServiceInfo::new(name.unwrap_or_else(|| "service".into()));
    info.version = env("CARGO_PKG_VERSION").filter(|s| !s.is_empty());
    info
}

impl Options {
    /// Resolves the options against an environment (`std::env::var` in production).
    pub(crate) fn resolve(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        hostname: &dyn Fn() -> Result<String, String>,
    ) -> Result<Settings, ConfigError> {
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
        let orchestrator_url = parse_orchestrator_url(&url_text, &url_source)?;

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

        let (port, port_source) = resolve_port(self.port, &self.port_env, env)?;

        let service_url = service_url(&host, port).map_err(|reason| ConfigError::InvalidHost {
            value: host.clone(),
            origin: host_source.to_string(),
            reason,
        })?;

        let info = match &self.info {
            Some(Ok(info)) => info.clone(),
            Some(Err(reason)) => return Err(ConfigError::InvalidInfo(reason.clone())),
            None => default_info(env),
        };

        let b = &self.behaviour;
        b.validate()?;

        Ok(Settings {
            orchestrator_url,
            service_url,
            host,
            host_source,
            port,
            port_source,
            registration_key: registration_key(self.registration_key.as_deref(), env)?,
            info,
            behaviour: b.clone(),
        })
    }
}

/// Port: parameter, then the variable `port_env`, then [`DEFAULT_PORT`].
fn resolve_port(
    param: Option<u16>,
    port_env: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(u16, Source), ConfigError> {
    match param {
        Some(0) => Err(ConfigError::InvalidPort {
            value: "0".into(),
            origin: Source::Parameter.to_string(),
        }),
        Some(p) => Ok((p, Source::Parameter)),
        // An empty value counts as unset, as for the host and the URL.
        None => match env(port_env).filter(|v| !v.trim().is_empty()) {
            Some(text) => {
                let source = Source::Env(port_env.to_owned());
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

/// The registration key: parameter, else `SERVICEKIT_REGISTRATION_KEY`. A trailing newline
/// (as secret files often have) is dropped; anything else that cannot travel in an HTTP header
/// is an error naming the source, never the secret itself.
fn registration_key(
    param: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, ConfigError> {
    let (key, origin) = match param {
        Some(k) => (k.to_owned(), Source::Parameter),
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
    Ok(Some(key))
}

/// The port a service should listen on, by the same rules the layer advertises it with:
/// `SERVICEKIT_PORT`, else 8000. Bind with this and the registered URL matches.
pub fn port_from_env() -> Result<u16, ConfigError> {
    resolve_port(None, PORT_ENV, &|name| std::env::var(name).ok()).map(|(p, _)| p)
}

fn parse_orchestrator_url(text: &str, source: &Source) -> Result<Url, ConfigError> {
    let bad = |reason: &str| ConfigError::InvalidOrchestratorUrl {
        value: text.to_owned(),
        origin: source.to_string(),
        reason: reason.to_owned(),
    };
    let url = Url::parse(text.trim()).map_err(|e| bad(&format!("not an absolute URL ({e})")))?;
    match url.scheme() {
        "http" => {}
        "https" => {
            return Err(bad(
                "https is not supported by this build; use http (e.g. inside the cluster network) or a TLS sidecar",
            ))
        }
        _ => return Err(bad("the scheme must be http")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("it has no host"));
    }
    Ok(url)
}

/// `http://host:port`, with IPv6 addresses in brackets.
fn service_url(host: &str, port: u16) -> Result<String, String> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let authority = match bare.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        Ok(IpAddr::V4(v4)) => format!("{v4}:{port}"),
        Err(_) => {
            if host.is_empty()
                || host.contains(|c: char| c.is_whitespace() || "/?#@[]:".contains(c))
            {
                return Err("a host name may not contain spaces or any of / ? # @ [ ] :".into());
            }
            format!("{host}:{port}")
        }
    };
    let text = format!("http://{authority}");
    Url::parse(&text).map_err(|e| e.to_string())?;
    Ok(text)
}

/// The machine hostname.
pub(crate) fn machine_hostname() -> Result<String, String> {
    gethostname::gethostname()
        .into_string()
        .map_err(|_| "the hostname is not valid UTF-8".to_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn resolve(opts: &Options, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        resolve_with_host(opts, vars, Ok("machine".into()))
    }

    fn resolve_with_host(
        opts: &Options,
        vars: &[(&str, &str)],
        host: Result<String, String>,
    ) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        opts.resolve(&|k| map.get(k).cloned(), &|| host.clone())
    }

    const URL: (&str, &str) = (ORCHESTRATOR_URL_ENV, "http://orch:9000/services/$register");

    #[test]
    fn host_priority_is_parameter_then_env_then_hostname() {
        let mut opts = Options::default();
        let s = resolve(&opts, &[URL]).unwrap();
        assert_eq!(
            (s.host.as_str(), &s.host_source),
            ("machine", &Source::AutoDetected)
        );
        assert_eq!(s.service_url, "http://machine:8000");

        let s = resolve(&opts, &[URL, (HOST_ENV, "svca")]).unwrap();
        assert_eq!(s.host, "svca");
        assert_eq!(s.host_source.to_string(), "env:SERVICEKIT_HOST");

        // An empty override falls through to auto-detection.
        let s = resolve(&opts, &[URL, (HOST_ENV, "  ")]).unwrap();
        assert_eq!(s.host_source, Source::AutoDetected);

        opts.host = Some("param".into());
        let s = resolve(&opts, &[URL, (HOST_ENV, "svca")]).unwrap();
        assert_eq!(
            (s.host.as_str(), s.host_source.to_string()),
            ("param", "parameter".into())
        );
    }

    #[test]
    fn no_host_anywhere_is_an_error() {
        let err = resolve_with_host(&Options::default(), &[URL], Err("boom".into())).unwrap_err();
        assert!(matches!(err, ConfigError::NoHost { .. }));
        assert!(err.to_string().contains("SERVICEKIT_HOST") && err.to_string().contains("boom"));
    }

    #[test]
    fn port_priority_is_parameter_then_env_then_default() {
        let mut opts = Options::default();
        let s = resolve(&opts, &[URL]).unwrap();
        assert_eq!(
            (s.port, s.port_source.to_string()),
            (8000, "default".into())
        );
        let s = resolve(&opts, &[URL, (PORT_ENV, "8001")]).unwrap();
        assert_eq!(
            (s.port, s.port_source.to_string()),
            (8001, "env:SERVICEKIT_PORT".into())
        );
        opts.port = Some(9);
        let s = resolve(&opts, &[URL, (PORT_ENV, "8001")]).unwrap();
        assert_eq!((s.port, s.port_source.to_string()), (9, "parameter".into()));
    }

    #[test]
    fn bad_ports_name_the_variable_and_value() {
        // An empty value is unset (the default), like an empty host or URL.
        let s = resolve(&Options::default(), &[URL, (PORT_ENV, " ")]).unwrap();
        assert_eq!(
            (s.port, s.port_source.to_string()),
            (8000, "default".into())
        );
        for bad in ["abc", "0", "65536", "-1"] {
            let err = resolve(&Options::default(), &[URL, (PORT_ENV, bad)]).unwrap_err();
            assert_eq!(
                err,
                ConfigError::InvalidPort {
                    value: bad.into(),
                    origin: "env:SERVICEKIT_PORT".into()
                }
            );
            let text = err.to_string();
            assert!(
                text.contains("SERVICEKIT_PORT") && text.contains(&format!("{bad:?}")),
                "{text}"
            );
        }
    }

    #[test]
    fn orchestrator_url_is_required_and_must_be_http() {
        let err = resolve(&Options::default(), &[]).unwrap_err();
        assert!(
            err.to_string().contains("SERVICEKIT_ORCHESTRATOR_URL"),
            "{err}"
        );
        for bad in [
            "orch:9000",
            "ftp://orch/x",
            "https://orch/x",
            "http://",
            "not a url",
        ] {
            let err = resolve(&Options::default(), &[(ORCHESTRATOR_URL_ENV, bad)]).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, ConfigError::InvalidOrchestratorUrl { .. }),
                "{bad}: {text}"
            );
            assert!(
                text.contains("SERVICEKIT_ORCHESTRATOR_URL") && text.contains(bad),
                "{text}"
            );
        }
    }

    #[test]
    fn custom_variable_names_are_used() {
        let opts = Options {
            orchestrator_url_env: "MY_URL".into(),
            host_env: "MY_HOST".into(),
            port_env: "MY_PORT".into(),
            ..Options::default()
        };
        let s = resolve(
            &opts,
            &[
                ("MY_URL", "http://o:1/r"),
                ("MY_HOST", "h"),
                ("MY_PORT", "7"),
                URL,
            ],
        )
        .unwrap();
        assert_eq!(s.orchestrator_url.as_str(), "http://o:1/r");
        assert_eq!(s.service_url, "http://h:7");
        assert_eq!(s.port_source.to_string(), "env:MY_PORT");
    }

    #[test]
    fn ipv6_hosts_are_bracketed_and_bad_hosts_rejected() {
        let mut opts = Options {
            host: Some("::1".into()),
            ..Options::default()
        };
        assert_eq!(
            resolve(&opts, &[URL]).unwrap().service_url,
            "http://[::1]:8000"
        );
        opts.host = Some("[fd00::2]".into());
        assert_eq!(
            resolve(&opts, &[URL]).unwrap().service_url,
            "http://[fd00::2]:8000"
        );
        opts.host = Some("10.0.0.7".into());
        assert_eq!(
            resolve(&opts, &[URL]).unwrap().service_url,
            "http://10.0.0.7:8000"
        );
        for bad in ["a b", "a/b", "host:80"] {
            opts.host = Some(bad.into());
            let err = resolve(&opts, &[URL]).unwrap_err();
            assert!(
                matches!(err, ConfigError::InvalidHost { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn info_defaults_to_the_cargo_package() {
        let s = resolve(
            &Options::default(),
            &[
                URL,
                ("CARGO_PKG_NAME", "svc"),
                ("CARGO_PKG_VERSION", "1.2.3"),
            ],
        )
        .unwrap();
        assert_eq!(s.info.display_name, "svc");
        assert_eq!(s.info.version.as_deref(), Some("1.2.3"));
    }

    #[test]
    fn info_must_have_a_display_name() {
        assert!(info_from(&serde_json::json!({"team": "x"})).is_err());
        assert!(info_from(&serde_json::json!({"display_name": " "})).is_err());
        assert!(info_from(&serde_json::json!(["x"])).is_err());
        let info = info_from(&serde_json::json!({"display_name": "A", "team": "x"})).unwrap();
        assert_eq!(info.extra["team"], "x");
        let opts = Options {
            info: Some(info_from(&serde_json::json!({"team": "x"}))),
            ..Options::default()
        };
        assert!(matches!(
            resolve(&opts, &[URL]),
            Err(ConfigError::InvalidInfo(_))
        ));
    }

    #[test]
    fn zero_attempts_and_zero_timeouts_are_rejected() {
        let opts = Options {
            behaviour: Behaviour {
                max_retries: 0,
                ..Behaviour::default()
            },
            ..Options::default()
        };
        assert!(resolve(&opts, &[URL])
            .unwrap_err()
            .to_string()
            .contains("max_retries"));
        let opts = Options {
            behaviour: Behaviour {
                timeout: Duration::ZERO,
                ..Behaviour::default()
            },
            ..Options::default()
        };
        assert!(resolve(&opts, &[URL])
            .unwrap_err()
            .to_string()
            .contains("timeout"));
        let opts = Options {
            behaviour: Behaviour {
                health_path: Some("health".into()),
                ..Behaviour::default()
            },
            ..Options::default()
        };
        assert!(resolve(&opts, &[URL])
            .unwrap_err()
            .to_string()
            .contains("health_path"));
    }

    #[test]
    fn registration_key_comes_from_the_environment() {
        let s = resolve(&Options::default(), &[URL, (REGISTRATION_KEY_ENV, "k")]).unwrap();
        assert_eq!(s.registration_key.as_deref(), Some("k"));
        // A secret file's trailing newline is not part of the key.
        let s = resolve(&Options::default(), &[URL, (REGISTRATION_KEY_ENV, "k\n")]).unwrap();
        assert_eq!(s.registration_key.as_deref(), Some("k"));
        let err = resolve(
            &Options::default(),
            &[URL, (REGISTRATION_KEY_ENV, "a\u{7}b")],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("SERVICEKIT_REGISTRATION_KEY"), "{err}");
        assert!(!err.contains("a\u{7}b"), "the secret is not echoed: {err}");
    }
}
