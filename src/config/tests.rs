use std::collections::HashMap;

use super::*;

fn resolve(o: &Overrides, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    resolve_with(o, &Tunables::default(), vars, Ok("machine".into()))
}

fn resolve_with(
    o: &Overrides,
    t: &Tunables,
    vars: &[(&str, &str)],
    host: Result<String, String>,
) -> Result<Config, ConfigError> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    o.resolve(t, &|k| map.get(k).cloned(), &|| host.clone())
}

const URL: (&str, &str) = (ORCHESTRATOR_URL_ENV, "http://orch:9000/services/$register");

#[test]
fn host_priority_is_parameter_then_env_then_hostname() {
    let mut o = Overrides::default();
    let c = resolve(&o, &[URL]).unwrap();
    assert_eq!(
        (c.host.as_str(), &c.host_source),
        ("machine", &Source::AutoDetected)
    );
    assert_eq!(c.service_url, "http://machine:8000");

    let c = resolve(&o, &[URL, (HOST_ENV, "svca")]).unwrap();
    assert_eq!(c.host, "svca");
    assert_eq!(c.host_source.to_string(), "env:SERVICEKIT_HOST");

    // An empty override falls through to auto-detection.
    let c = resolve(&o, &[URL, (HOST_ENV, "  ")]).unwrap();
    assert_eq!(c.host_source, Source::AutoDetected);

    o.host = Some("param".into());
    let c = resolve(&o, &[URL, (HOST_ENV, "svca")]).unwrap();
    assert_eq!(
        (c.host.as_str(), c.host_source.to_string()),
        ("param", "parameter".into())
    );
}

#[test]
fn no_host_anywhere_is_an_error() {
    let err = resolve_with(
        &Overrides::default(),
        &Tunables::default(),
        &[URL],
        Err("boom".into()),
    )
    .unwrap_err();
    assert!(matches!(err, ConfigError::NoHost { .. }));
    assert!(err.to_string().contains("SERVICEKIT_HOST") && err.to_string().contains("boom"));
}

#[test]
fn port_priority_is_parameter_then_env_then_default() {
    let mut o = Overrides::default();
    let c = resolve(&o, &[URL]).unwrap();
    assert_eq!(
        (c.port, c.port_source.to_string()),
        (8000, "default".into())
    );
    let c = resolve(&o, &[URL, (PORT_ENV, "8001")]).unwrap();
    assert_eq!(
        (c.port, c.port_source.to_string()),
        (8001, "env:SERVICEKIT_PORT".into())
    );
    o.port = Some(9);
    let c = resolve(&o, &[URL, (PORT_ENV, "8001")]).unwrap();
    assert_eq!((c.port, c.port_source.to_string()), (9, "parameter".into()));
}

#[test]
fn bad_ports_name_the_variable_and_value() {
    // An empty value is unset (the default), like an empty host or URL.
    let c = resolve(&Overrides::default(), &[URL, (PORT_ENV, " ")]).unwrap();
    assert_eq!(
        (c.port, c.port_source.to_string()),
        (8000, "default".into())
    );
    for bad in ["abc", "0", "65536", "-1"] {
        let err = resolve(&Overrides::default(), &[URL, (PORT_ENV, bad)]).unwrap_err();
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
    let err = resolve(&Overrides::default(), &[]).unwrap_err();
    assert!(
        err.to_string().contains("SERVICEKIT_ORCHESTRATOR_URL"),
        "{err}"
    );
    for bad in [
        "orch:9000",
        "ftp://orch/x",
        "http://",
        "not a url",
        "/services",
    ] {
        let err = resolve(&Overrides::default(), &[(ORCHESTRATOR_URL_ENV, bad)]).unwrap_err();
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

#[cfg(not(feature = "tls"))]
#[test]
fn https_without_the_tls_feature_names_the_feature() {
    let err = resolve(
        &Overrides::default(),
        &[(ORCHESTRATOR_URL_ENV, "https://u:secret@orch:9443")],
    )
    .unwrap_err();
    assert_eq!(
        err,
        ConfigError::TlsNotEnabled {
            value: "https://u:***@orch:9443".into(),
            origin: "env:SERVICEKIT_ORCHESTRATOR_URL".into(),
        }
    );
    let text = err.to_string();
    assert!(
        text.contains("`tls` feature") && text.contains("SERVICEKIT_ORCHESTRATOR_URL"),
        "{text}"
    );
}

#[cfg(feature = "tls")]
#[test]
fn https_is_kept_with_the_tls_feature() {
    let config = resolve(
        &Overrides::default(),
        &[(ORCHESTRATOR_URL_ENV, "https://orch:9443")],
    )
    .unwrap();
    assert_eq!(
        config.orchestrator_url.to_string(),
        "https://orch:9443/services/$register"
    );
}

#[test]
fn the_base_url_is_enough() {
    let endpoint = |given: &str| {
        resolve(&Overrides::default(), &[(ORCHESTRATOR_URL_ENV, given)])
            .unwrap()
            .orchestrator_url
            .to_string()
    };
    for (given, want) in [
        ("http://orch:9000", "http://orch:9000/services/$register"),
        ("http://orch:9000/", "http://orch:9000/services/$register"),
        (" http://orch:9000 ", "http://orch:9000/services/$register"),
        (
            "http://orch:9000/services/$register",
            "http://orch:9000/services/$register",
        ),
        (
            "http://orch:9000/services/%24register",
            "http://orch:9000/services/%24register",
        ),
        // "…/services/$register" in double quotes: the shell ate `$register`.
        (
            "http://orch:9000/services/",
            "http://orch:9000/services/$register",
        ),
        (
            "http://orch:9000/services",
            "http://orch:9000/services/$register",
        ),
        // Behind a proxy with a path prefix.
        (
            "http://gw/registry/",
            "http://gw/registry/services/$register",
        ),
    ] {
        assert_eq!(endpoint(given), want, "{given}");
    }
}

#[test]
fn credentials_in_the_orchestrator_url_are_refused_and_not_echoed() {
    let err = resolve(
        &Overrides::default(),
        &[(ORCHESTRATOR_URL_ENV, "http://u:hunter2@orch:9000")],
    )
    .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(text.contains(REGISTRATION_KEY_ENV), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    // A password holding '/' is hidden whole (http::Uri would read "u:pa" as the authority).
    let err = resolve(
        &Overrides::default(),
        &[(ORCHESTRATOR_URL_ENV, "http://u:pa/ss@orch:9000")],
    )
    .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains("pa/ss") && !text.contains("ss@"), "{text}");
    assert_eq!(
        crate::redact::url("http://u:pa/ss@h:1/x"),
        "http://u:***@h:1/x"
    );
}

#[test]
fn custom_variable_names_are_used() {
    let o = Overrides {
        orchestrator_url_env: "MY_URL".into(),
        host_env: "MY_HOST".into(),
        port_env: "MY_PORT".into(),
        ..Overrides::default()
    };
    let c = resolve(
        &o,
        &[
            ("MY_URL", "http://o:1/r"),
            ("MY_HOST", "h"),
            ("MY_PORT", "7"),
            URL,
        ],
    )
    .unwrap();
    assert_eq!(c.orchestrator_url, "http://o:1/r/services/$register");
    assert_eq!(c.service_url, "http://h:7");
    assert_eq!(c.port_source.to_string(), "env:MY_PORT");
}

#[test]
fn ipv6_hosts_are_bracketed_and_bad_hosts_rejected() {
    let mut o = Overrides {
        host: Some("::1".into()),
        ..Overrides::default()
    };
    assert_eq!(
        resolve(&o, &[URL]).unwrap().service_url,
        "http://[::1]:8000"
    );
    o.host = Some("[fd00::2]".into());
    assert_eq!(
        resolve(&o, &[URL]).unwrap().service_url,
        "http://[fd00::2]:8000"
    );
    o.host = Some("10.0.0.7".into());
    assert_eq!(
        resolve(&o, &[URL]).unwrap().service_url,
        "http://10.0.0.7:8000"
    );
    for bad in ["a b", "a/b", "host:80", "a%b"] {
        o.host = Some(bad.into());
        let err = resolve(&o, &[URL]).unwrap_err();
        assert!(
            matches!(err, ConfigError::InvalidHost { .. }),
            "{bad}: {err}"
        );
    }
}

#[test]
fn info_defaults_to_the_executable_and_the_display_name_variable_wins() {
    // Never the CARGO_PKG_* variables `cargo run` sets: the default must not depend on how
    // the program was started.
    let c = resolve(&Overrides::default(), &[URL, ("CARGO_PKG_NAME", "svc")]).unwrap();
    let exe = std::env::current_exe().unwrap();
    assert_eq!(
        c.info.display_name,
        exe.file_stem().unwrap().to_string_lossy()
    );
    assert_eq!(c.info.version, None);

    let o = Overrides {
        info: Some(Ok(ServiceInfo::new("given").with_version("1.2.3"))),
        ..Overrides::default()
    };
    let c = resolve(&o, &[URL, (DISPLAY_NAME_ENV, " svca ")]).unwrap();
    assert_eq!(c.info.display_name, "svca");
    assert_eq!(c.info.version.as_deref(), Some("1.2.3"));
}

#[test]
fn info_must_have_a_display_name() {
    assert!(info_from(&serde_json::json!({"team": "x"})).is_err());
    assert!(info_from(&serde_json::json!({"display_name": " "})).is_err());
    assert!(info_from(&serde_json::json!(["x"])).is_err());
    let info = info_from(&serde_json::json!({"display_name": "A", "team": "x"})).unwrap();
    assert_eq!(info.extra["team"], "x");
    let o = Overrides {
        info: Some(info_from(&serde_json::json!({"team": "x"}))),
        ..Overrides::default()
    };
    assert!(matches!(
        resolve(&o, &[URL]),
        Err(ConfigError::InvalidInfo(_))
    ));
}

#[test]
fn zero_attempts_and_zero_timeouts_are_rejected() {
    let check = |t: Tunables, name: &str| {
        let err = resolve_with(&Overrides::default(), &t, &[URL], Ok("m".into())).unwrap_err();
        assert!(err.to_string().contains(name), "{err}");
    };
    check(
        Tunables {
            max_attempts: 0,
            ..Tunables::default()
        },
        "max_attempts",
    );
    check(
        Tunables {
            timeout: Duration::ZERO,
            ..Tunables::default()
        },
        "timeout",
    );
    check(
        Tunables {
            shutdown_timeout: Duration::ZERO,
            ..Tunables::default()
        },
        "shutdown_timeout",
    );
    check(
        Tunables {
            health_path: Some("health".into()),
            ..Tunables::default()
        },
        "health_path",
    );
    check(
        Tunables {
            health_path: Some("/a b".into()),
            ..Tunables::default()
        },
        "health_path",
    );
}

#[test]
fn registration_key_comes_from_the_environment_and_never_shows() {
    let c = resolve(
        &Overrides::default(),
        &[URL, (REGISTRATION_KEY_ENV, "k-secret")],
    )
    .unwrap();
    assert_eq!(
        c.registration_key.as_ref().map(RegistrationKey::expose),
        Some("k-secret")
    );
    assert!(!format!("{c:?}").contains("k-secret"), "{c:?}");
    // A secret file's trailing newline is not part of the key.
    let c = resolve(&Overrides::default(), &[URL, (REGISTRATION_KEY_ENV, "k\n")]).unwrap();
    assert_eq!(
        c.registration_key.as_ref().map(RegistrationKey::expose),
        Some("k")
    );
    let err = resolve(
        &Overrides::default(),
        &[URL, (REGISTRATION_KEY_ENV, "a\u{7}b")],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("SERVICEKIT_REGISTRATION_KEY"), "{err}");
    assert!(!err.contains("a\u{7}b"), "the secret is not echoed: {err}");
}

// --- The declared pull check ---

fn check_of(o: &Overrides, vars: &[(&str, &str)]) -> Result<Option<CheckSpec>, ConfigError> {
    let mut all = vec![URL];
    all.extend_from_slice(vars);
    resolve(o, &all).map(|c| c.check)
}

fn check_error(vars: &[(&str, &str)]) -> (String, String) {
    match check_of(&Overrides::default(), vars) {
        Err(ConfigError::InvalidCheck { origin, reason }) => (origin, reason),
        other => panic!("expected InvalidCheck for {vars:?}, got {other:?}"),
    }
}

#[test]
fn no_check_unless_one_is_declared() {
    assert_eq!(check_of(&Overrides::default(), &[]), Ok(None));
    assert_eq!(
        check_of(&Overrides::default(), &[(CHECK_HTTP_ENV, "  ")]),
        Ok(None),
        "an empty value is unset"
    );
}

#[test]
fn a_check_comes_from_the_environment_with_its_numbers() {
    let c = check_of(
        &Overrides::default(),
        &[
            (CHECK_HTTP_ENV, "/health"),
            (CHECK_INTERVAL_ENV, "5"),
            (CHECK_TIMEOUT_ENV, "3"),
            (CHECK_DEREGISTER_ENV, "300"),
        ],
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        c,
        CheckSpec::http("/health")
            .interval(Duration::from_secs(5))
            .timeout(Duration::from_secs(3))
            .deregister_critical_after(Duration::from_secs(300))
    );
    let c = check_of(&Overrides::default(), &[(CHECK_TCP_ENV, "true")]);
    assert_eq!(c, Ok(Some(CheckSpec::tcp())));
    let c = check_of(
        &Overrides::default(),
        &[(CHECK_GRPC_ENV, "orders.v1.Orders")],
    );
    assert_eq!(c, Ok(Some(CheckSpec::grpc("orders.v1.Orders"))));
    let c = check_of(&Overrides::default(), &[(CHECK_GRPC_ENV, "*")]);
    assert_eq!(c, Ok(Some(CheckSpec::grpc(""))), "* is the whole server");
    // A 1 s interval takes the default timeout (2 s) down with it.
    let c = check_of(
        &Overrides::default(),
        &[(CHECK_HTTP_ENV, "/health"), (CHECK_INTERVAL_ENV, "1")],
    )
    .unwrap()
    .unwrap();
    assert_eq!((c.interval_seconds, c.timeout_seconds), (1, 1));
}

#[test]
fn the_builder_check_wins_over_the_environment() {
    let o = Overrides {
        check: Some(CheckSpec::tcp()),
        ..Overrides::default()
    };
    assert_eq!(
        check_of(
            &o,
            &[(CHECK_HTTP_ENV, "/health"), (CHECK_INTERVAL_ENV, "x")]
        ),
        Ok(Some(CheckSpec::tcp()))
    );
    let o = Overrides {
        check: Some(CheckSpec::http("health")),
        ..Overrides::default()
    };
    let err = check_of(&o, &[]).unwrap_err();
    assert!(
        matches!(&err, ConfigError::InvalidCheck { origin, .. } if origin == "parameter"),
        "{err:?}"
    );
    assert!(err.to_string().contains("\"health\""), "{err}");
    let o = Overrides {
        check: Some(
            CheckSpec::http("/h")
                .interval(Duration::from_secs(1))
                .timeout(Duration::from_secs(2)),
        ),
        ..Overrides::default()
    };
    let err = check_of(&o, &[]).unwrap_err().to_string();
    assert!(err.contains("timeout is 2 s"), "{err}");
}

#[test]
fn check_mistakes_name_their_variable() {
    let (origin, reason) = check_error(&[(CHECK_HTTP_ENV, "/h"), (CHECK_INTERVAL_ENV, "soon")]);
    assert_eq!(origin, "env:SERVICEKIT_CHECK_INTERVAL_SECONDS");
    assert!(reason.contains("\"soon\""), "{reason}");

    let (origin, reason) = check_error(&[(CHECK_HTTP_ENV, "/h"), (CHECK_INTERVAL_ENV, "0")]);
    assert_eq!(origin, "env:SERVICEKIT_CHECK_INTERVAL_SECONDS");
    assert!(reason.contains("from 1 to 3600"), "{reason}");

    let (origin, reason) = check_error(&[(CHECK_HTTP_ENV, "/h"), (CHECK_TIMEOUT_ENV, "20")]);
    assert_eq!(origin, "env:SERVICEKIT_CHECK_TIMEOUT_SECONDS");
    assert!(reason.contains("interval (10 s)"), "{reason}");

    let (origin, _) = check_error(&[(CHECK_HTTP_ENV, "/h"), (CHECK_DEREGISTER_ENV, "0")]);
    assert_eq!(
        origin,
        "env:SERVICEKIT_CHECK_DEREGISTER_CRITICAL_AFTER_SECONDS"
    );

    let (origin, reason) = check_error(&[(CHECK_HTTP_ENV, "/h"), (CHECK_TCP_ENV, "true")]);
    assert_eq!(origin, "env:SERVICEKIT_CHECK_TCP");
    assert!(
        reason.contains("SERVICEKIT_CHECK_HTTP") && reason.contains("only one"),
        "{reason}"
    );

    let (origin, reason) = check_error(&[(CHECK_TCP_ENV, "maybe")]);
    assert_eq!(origin, "env:SERVICEKIT_CHECK_TCP");
    assert!(reason.contains("true"), "{reason}");

    let (origin, reason) = check_error(&[(CHECK_HTTP_ENV, "health")]);
    assert_eq!(origin, "env:SERVICEKIT_CHECK_HTTP");
    assert!(reason.contains("starting with '/'"), "{reason}");

    let (origin, reason) = check_error(&[(CHECK_INTERVAL_ENV, "5")]);
    assert_eq!(origin, "env:SERVICEKIT_CHECK_INTERVAL_SECONDS");
    assert!(reason.contains("no check is"), "{reason}");

    let err = check_of(&Overrides::default(), &[(CHECK_HTTP_ENV, "bad path")]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("invalid health check from env:SERVICEKIT_CHECK_HTTP:"),
        "{err}"
    );
}

#[test]
fn a_zero_health_timeout_is_refused() {
    let t = Tunables {
        health_timeout: Duration::ZERO,
        ..Tunables::default()
    };
    let err = resolve_with(&Overrides::default(), &t, &[URL], Ok("m".into())).unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::InvalidOption {
                name: "health_timeout",
                ..
            }
        ),
        "{err:?}"
    );
}
