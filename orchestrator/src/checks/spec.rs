//! What a registration's `check` may ask for, and where exactly it points.
//!
//! A check is run by the orchestrator against a URL that a client chose, so the rules here
//! are what keeps a registration from turning the orchestrator into a scanner of other hosts:
//! every target is on the registered URL's own host, decided once at registration.

use std::time::Duration;

use serde_json::{Map, Value};
use servicekit::protocol::{CheckSpec, CheckTarget, CHECK_FIELDS};
use url::Url;

/// Bounds of `interval_seconds`.
pub const INTERVAL_RANGE: std::ops::RangeInclusive<u64> = 1..=3600;
/// The longest `timeout_seconds`; it may not exceed the interval either.
pub const MAX_TIMEOUT_SECONDS: u64 = 60;
/// Bounds of `failures_before_critical` and `successes_before_passing`.
pub const THRESHOLD_RANGE: std::ops::RangeInclusive<u32> = 1..=10;
/// The longest `grpc` service name and `http` path.
const MAX_TARGET_LEN: usize = 512;

/// Where a validated check points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `GET` of this absolute URL (on the service's host).
    Http(Url),
    /// A TCP connect to this host and port.
    Tcp { host: String, port: u16 },
    /// `grpc.health.v1.Health/Check` of `service` on this URL's host and port (`https`:
    /// over TLS, else cleartext HTTP/2).
    Grpc { url: Url, service: String },
}

impl Probe {
    /// Resolves `spec` against the canonical service URL it was registered with; `Err` says
    /// what is wrong with it, for a 400. Also checks the spec's numbers.
    pub fn resolve(spec: &CheckSpec, service_url: &str) -> Result<Probe, String> {
        let base = Url::parse(service_url).map_err(|e| format!("service url: {e}"))?;
        let host = base.host_str().unwrap_or_default().to_owned();
        let port = base
            .port_or_known_default()
            .ok_or("the service url has no port")?;
        if !INTERVAL_RANGE.contains(&spec.interval_seconds) {
            return Err(format!(
                "check.interval_seconds must be from {} to {}",
                INTERVAL_RANGE.start(),
                INTERVAL_RANGE.end()
            ));
        }
        let longest = spec.interval_seconds.min(MAX_TIMEOUT_SECONDS);
        if !(1..=longest).contains(&spec.timeout_seconds) {
            return Err(format!(
                "check.timeout_seconds must be from 1 to {longest} (at most the interval and \
                 {MAX_TIMEOUT_SECONDS})"
            ));
        }
        for (name, n) in [
            ("failures_before_critical", spec.failures_before_critical),
            ("successes_before_passing", spec.successes_before_passing),
        ] {
            if !THRESHOLD_RANGE.contains(&n) {
                return Err(format!(
                    "check.{name} must be from {} to {}",
                    THRESHOLD_RANGE.start(),
                    THRESHOLD_RANGE.end()
                ));
            }
        }
        if spec.deregister_critical_after_seconds == Some(0) {
            return Err("check.deregister_critical_after_seconds must be at least 1".into());
        }
        match spec.target().map_err(|e| format!("check: {e}"))? {
            CheckTarget::Http(target) => {
                if target.len() > MAX_TARGET_LEN {
                    return Err(format!("check.http is longer than {MAX_TARGET_LEN} bytes"));
                }
                let url = if target.starts_with('/') {
                    // Appended to the service URL's path, so a service mounted under a prefix
                    // checks its own `/health`.
                    let mut url = base.clone();
                    let joined = format!("{}{target}", base.path().trim_end_matches('/'));
                    let (path, query) = match joined.split_once('?') {
                        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
                        None => (joined, None),
                    };
                    url.set_path(&path);
                    url.set_query(query.as_deref());
                    url
                } else {
                    let url = Url::parse(target).map_err(|_| {
                        "check.http must be a path starting with '/' or an absolute http(s) URL"
                            .to_owned()
                    })?;
                    if !matches!(url.scheme(), "http" | "https") {
                        return Err("check.http: scheme must be http or https".into());
                    }
                    if url.host_str() != Some(host.as_str()) {
                        return Err("check.http must be on the service url's own host: the \
                             orchestrator checks no other host"
                            .into());
                    }
                    if !url.username().is_empty() || url.password().is_some() {
                        return Err("check.http must not contain a user name or password".into());
                    }
                    url
                };
                let mut url = url;
                url.set_fragment(None);
                Ok(Probe::Http(url))
            }
            CheckTarget::Tcp => Ok(Probe::Tcp { host, port }),
            CheckTarget::Grpc(service) => {
                if service.len() > MAX_TARGET_LEN {
                    return Err(format!("check.grpc is longer than {MAX_TARGET_LEN} bytes"));
                }
                let mut url = base.clone();
                url.set_path("/");
                url.set_query(None);
                Ok(Probe::Grpc {
                    url,
                    service: service.to_owned(),
                })
            }
        }
    }
}

/// What only the registration's JSON tells about its `check` (`raw`): a field this version
/// does not know is an error (a typo would otherwise silently check something else), and a
/// left-out `timeout_seconds` is the default or the interval, whichever is shorter (so
/// `{"http": "/health", "interval_seconds": 1}` is valid as written).
pub fn settle(spec: &mut CheckSpec, raw: &Map<String, Value>) -> Result<(), String> {
    if let Some(unknown) = raw.keys().find(|k| !CHECK_FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "check: unknown field {:?}; a check takes {}",
            unknown.chars().take(64).collect::<String>(),
            CHECK_FIELDS.join(", ")
        ));
    }
    if !raw.contains_key("timeout_seconds") {
        spec.timeout_seconds = spec.timeout_seconds.min(spec.interval_seconds).max(1);
    }
    Ok(())
}

/// The interval of a spec.
pub fn interval(spec: &CheckSpec) -> Duration {
    Duration::from_secs(spec.interval_seconds)
}

/// The timeout of one probe of a spec.
pub fn timeout(spec: &CheckSpec) -> Duration {
    Duration::from_secs(spec.timeout_seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(target: &str, base: &str) -> Result<String, String> {
        match Probe::resolve(&CheckSpec::http(target), base)? {
            Probe::Http(url) => Ok(url.to_string()),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn an_http_path_is_appended_to_the_service_url() {
        assert_eq!(
            http("/health", "http://a:8080").unwrap(),
            "http://a:8080/health"
        );
        assert_eq!(
            http("/health?deep=1", "http://a:8080/api/").unwrap(),
            "http://a:8080/api/health?deep=1"
        );
        assert_eq!(
            http("https://a:9443/ready", "http://a:8080").unwrap(),
            "https://a:9443/ready"
        );
    }

    #[test]
    fn no_other_host_and_no_nonsense() {
        for bad in [
            "http://b:8080/health",
            "http://user@a:1/",
            "ftp://a/x",
            "health",
            "http://a.evil/x",
        ] {
            assert!(http(bad, "http://a:8080").is_err(), "{bad}");
        }
        let mut spec = CheckSpec::tcp();
        spec.timeout_seconds = 11;
        assert!(
            Probe::resolve(&spec, "http://a:1").is_err(),
            "timeout beyond the interval"
        );
        spec.timeout_seconds = 2;
        spec.interval_seconds = 0;
        assert!(Probe::resolve(&spec, "http://a:1").is_err());
        spec.interval_seconds = 10;
        spec.failures_before_critical = 0;
        assert!(Probe::resolve(&spec, "http://a:1").is_err());
    }

    #[test]
    fn settling_refuses_unknown_fields_and_fits_a_left_out_timeout() {
        let raw = |v: Value| v.as_object().cloned().expect("object");
        let mut spec = CheckSpec::tcp();
        spec.interval_seconds = 1;
        settle(
            &mut spec,
            &raw(serde_json::json!({"tcp": true, "interval_seconds": 1})),
        )
        .expect("valid");
        assert_eq!(spec.timeout_seconds, 1);
        assert!(Probe::resolve(&spec, "http://a:1").is_ok());
        let mut spec = CheckSpec::tcp();
        spec.interval_seconds = 1;
        spec.timeout_seconds = 2;
        let given =
            raw(serde_json::json!({"tcp": true, "interval_seconds": 1, "timeout_seconds": 2}));
        settle(&mut spec, &given).expect("valid fields");
        assert!(
            Probe::resolve(&spec, "http://a:1").is_err(),
            "an explicit timeout stays"
        );
        let err = settle(
            &mut CheckSpec::tcp(),
            &raw(serde_json::json!({"tcp": true, "htp": 1})),
        )
        .unwrap_err();
        assert!(err.contains("\"htp\""), "{err}");
    }

    #[test]
    fn tcp_and_grpc_take_the_service_host_and_port() {
        assert_eq!(
            Probe::resolve(&CheckSpec::tcp(), "http://a").unwrap(),
            Probe::Tcp {
                host: "a".into(),
                port: 80
            }
        );
        let Probe::Grpc { url, service } =
            Probe::resolve(&CheckSpec::grpc("svc.v1.Echo"), "http://a:50051/x").unwrap()
        else {
            panic!("not grpc")
        };
        assert_eq!(
            (url.as_str(), service.as_str()),
            ("http://a:50051/", "svc.v1.Echo")
        );
    }
}
