//! The pull check a service declares for the orchestrator to run (`check` in the
//! registration): from the builder, else from `SERVICEKIT_CHECK_*`.
//!
//! Checked here for what the library can know (one target, numbers in range) so a mistake is
//! a [`ConfigError`] at start-up naming the variable, not a 400 in a retry loop; the
//! orchestrator still applies its own rules (the same-host rule, its bounds).

use crate::protocol::{CheckSpec, CheckTarget};

use super::{ConfigError, Env, Source};

/// `SERVICEKIT_CHECK_HTTP`: an HTTP check of this path (`/health`) or same-host URL.
pub const CHECK_HTTP_ENV: &str = "SERVICEKIT_CHECK_HTTP";
/// `SERVICEKIT_CHECK_TCP=true`: a TCP connect check.
pub const CHECK_TCP_ENV: &str = "SERVICEKIT_CHECK_TCP";
/// `SERVICEKIT_CHECK_GRPC`: a gRPC health check of this service name (`*`: the whole server).
pub const CHECK_GRPC_ENV: &str = "SERVICEKIT_CHECK_GRPC";
/// `SERVICEKIT_CHECK_INTERVAL_SECONDS`: seconds between checks (default 10).
pub const CHECK_INTERVAL_ENV: &str = "SERVICEKIT_CHECK_INTERVAL_SECONDS";
/// `SERVICEKIT_CHECK_TIMEOUT_SECONDS`: seconds one check may take (default 2).
pub const CHECK_TIMEOUT_ENV: &str = "SERVICEKIT_CHECK_TIMEOUT_SECONDS";
/// `SERVICEKIT_CHECK_DEREGISTER_CRITICAL_AFTER_SECONDS`: deregister after this long critical.
pub const CHECK_DEREGISTER_ENV: &str = "SERVICEKIT_CHECK_DEREGISTER_CRITICAL_AFTER_SECONDS";

/// The longest interval the orchestrator accepts, in seconds.
const MAX_INTERVAL_SECONDS: u64 = 3600;
/// The longest timeout the orchestrator accepts, in seconds.
const MAX_TIMEOUT_SECONDS: u64 = 60;

/// The check to declare: the builder's, else the environment's, else none.
pub(crate) fn resolve_check(
    param: Option<&CheckSpec>,
    env: Env<'_>,
) -> Result<Option<CheckSpec>, ConfigError> {
    if let Some(spec) = param {
        validate(spec, &Source::Parameter)?;
        return Ok(Some(spec.clone()));
    }
    let var = |name: &str| {
        env(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .map(|v| (v, Source::Env(name.to_owned())))
    };
    let bad = |origin: &Source, reason: String| ConfigError::InvalidCheck {
        origin: origin.to_string(),
        reason,
    };
    let targets: Vec<(CheckSpec, Source)> = [
        var(CHECK_HTTP_ENV).map(|(v, s)| Ok((CheckSpec::http(v), s))),
        var(CHECK_TCP_ENV).map(|(v, s)| match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok((CheckSpec::tcp(), s)),
            _ => Err(bad(
                &s,
                format!("{v:?}: set it to true for a TCP check, or unset it"),
            )),
        }),
        var(CHECK_GRPC_ENV).map(|(v, s)| {
            let service = if v == "*" { String::new() } else { v };
            Ok((CheckSpec::grpc(service), s))
        }),
    ]
    .into_iter()
    .flatten()
    .collect::<Result<_, _>>()?;
    let numbers = [CHECK_INTERVAL_ENV, CHECK_TIMEOUT_ENV, CHECK_DEREGISTER_ENV];
    let mut spec = match targets.as_slice() {
        [] => {
            if let Some((_, s)) = numbers.iter().find_map(|n| var(n)) {
                return Err(bad(
                    &s,
                    format!("it is set but no check is: set {CHECK_HTTP_ENV}, {CHECK_TCP_ENV} or {CHECK_GRPC_ENV}"),
                ));
            }
            return Ok(None);
        }
        [(spec, _)] => spec.clone(),
        [(_, first), (_, second), ..] => {
            return Err(bad(
                second,
                format!("{first} is set too: a check takes only one of http, tcp or grpc"),
            ))
        }
    };
    let seconds = |name: &str| -> Result<Option<(u64, Source)>, ConfigError> {
        match var(name) {
            None => Ok(None),
            Some((v, s)) => match v.parse::<u64>() {
                Ok(n) => Ok(Some((n, s))),
                Err(_) => Err(bad(&s, format!("{v:?} is not a whole number of seconds"))),
            },
        }
    };
    if let Some((n, s)) = seconds(CHECK_INTERVAL_ENV)? {
        spec.interval_seconds = n;
        validate_interval(&spec, &s)?;
        // The default timeout (2 s) would exceed a 1 s interval: it follows the interval
        // down unless set.
        spec.timeout_seconds = spec.timeout_seconds.min(n);
    }
    if let Some((n, s)) = seconds(CHECK_TIMEOUT_ENV)? {
        spec.timeout_seconds = n;
        validate_timeout(&spec, &s)?;
    }
    if let Some((n, s)) = seconds(CHECK_DEREGISTER_ENV)? {
        spec.deregister_critical_after_seconds = Some(n);
        validate(&spec, &s)?;
    }
    validate(&spec, &Source::Env(target_var(&spec).to_owned()))?;
    Ok(Some(spec))
}

fn target_var(spec: &CheckSpec) -> &'static str {
    match spec.target() {
        Ok(CheckTarget::Tcp) => CHECK_TCP_ENV,
        Ok(CheckTarget::Grpc(_)) => CHECK_GRPC_ENV,
        _ => CHECK_HTTP_ENV,
    }
}

fn validate_interval(spec: &CheckSpec, origin: &Source) -> Result<(), ConfigError> {
    if !(1..=MAX_INTERVAL_SECONDS).contains(&spec.interval_seconds) {
        return Err(ConfigError::InvalidCheck {
            origin: origin.to_string(),
            reason: format!(
                "the interval is {} s: it must be from 1 to {MAX_INTERVAL_SECONDS} s",
                spec.interval_seconds
            ),
        });
    }
    Ok(())
}

fn validate_timeout(spec: &CheckSpec, origin: &Source) -> Result<(), ConfigError> {
    let longest = spec.interval_seconds.min(MAX_TIMEOUT_SECONDS);
    if !(1..=longest).contains(&spec.timeout_seconds) {
        return Err(ConfigError::InvalidCheck {
            origin: origin.to_string(),
            reason: format!(
                "the timeout is {} s: it must be from 1 s to the interval ({} s) and at most {MAX_TIMEOUT_SECONDS} s",
                spec.timeout_seconds, spec.interval_seconds
            ),
        });
    }
    Ok(())
}

/// What the library can check of a spec: one target, an http path that is a path or URL,
/// numbers the orchestrator takes.
fn validate(spec: &CheckSpec, origin: &Source) -> Result<(), ConfigError> {
    let bad = |reason: String| ConfigError::InvalidCheck {
        origin: origin.to_string(),
        reason,
    };
    match spec.target().map_err(|e| bad(e.to_owned()))? {
        CheckTarget::Http(path) => {
            let ok = if path.starts_with('/') {
                path.parse::<http::uri::PathAndQuery>().is_ok()
            } else {
                path.parse::<http::Uri>()
                    .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")))
            };
            if !ok {
                return Err(bad(format!(
                    "http check {path:?}: a path starting with '/' (e.g. /health) or an http(s) URL on the service's host"
                )));
            }
        }
        CheckTarget::Tcp | CheckTarget::Grpc(_) => {}
    }
    validate_interval(spec, origin)?;
    validate_timeout(spec, origin)?;
    if spec.deregister_critical_after_seconds == Some(0) {
        return Err(bad(
            "deregister_critical_after_seconds must be at least 1 (unset it to never deregister)"
                .into(),
        ));
    }
    for (name, n) in [
        ("failures_before_critical", spec.failures_before_critical),
        ("successes_before_passing", spec.successes_before_passing),
    ] {
        if !(1..=10).contains(&n) {
            return Err(bad(format!("{name} is {n}: it must be from 1 to 10")));
        }
    }
    Ok(())
}
