//! Property tests: the wire types, timestamps, URL canonicalisation and the request handler,
//! each checked on generated input rather than a handful of examples.
//!
//! The handler property drives the same harness as the fuzz target in `fuzz/` (run by hand,
//! see `fuzz/README.md`), so the harness itself is compiled and exercised by every CI run.

use proptest::prelude::*;
use serde_json::{Map, Value};
use servicekit::protocol::{
    Health, HealthStatus, LeaseToken, ListResponse, Problem, RegisterRequest, RegisterResponse,
    RegistrationStatus, ServiceInfo, ServiceRecord, Timestamp,
};
use servicekit_orchestrator::api::canonical_url;
use ulid::Ulid;

#[path = "../fuzz/harness.rs"]
mod harness;

/// The largest timestamp the RFC 3339 text form can hold: 9999-12-31T23:59:59.999Z.
const MAX_MILLIS: u64 = 253_402_300_799_999;

fn timestamp() -> impl Strategy<Value = Timestamp> {
    (0..=MAX_MILLIS).prop_map(Timestamp::from_millis)
}

fn ulid() -> impl Strategy<Value = Ulid> {
    any::<u128>().prop_map(Ulid)
}

/// JSON values as a service's info may hold them: scalars, arrays and objects, two levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        // Finite floats only: JSON has no NaN or infinity.
        (-1e12f64..1e12).prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn service_info() -> impl Strategy<Value = ServiceInfo> {
    (
        any::<String>(),
        proptest::option::of(any::<String>()),
        proptest::option::of(any::<String>()),
        prop::collection::btree_map("[a-z_]{1,12}", json_value(), 0..4),
    )
        .prop_map(|(display_name, version, description, extra)| {
            let mut info = ServiceInfo::new(display_name);
            info.version = version;
            info.description = description;
            // The named fields are not extra fields: a generated `version` key would be read
            // back into `version` and the value would not round-trip as generated.
            info.extra = extra
                .into_iter()
                .filter(|(k, _)| !matches!(k.as_str(), "display_name" | "version" | "description"))
                .collect::<Map<String, Value>>();
            info
        })
}

fn service_record() -> impl Strategy<Value = ServiceRecord> {
    (
        ulid(),
        any::<String>(),
        service_info(),
        [timestamp(), timestamp(), timestamp(), timestamp()],
        health(),
    )
        .prop_map(|(id, url, info, [a, b, c, d], health)| ServiceRecord {
            id,
            url,
            info,
            registered_at: a,
            last_updated: b,
            last_ping_at: c,
            expires_at: d,
            health,
            check: None,
        })
}

fn health() -> impl Strategy<Value = Health> {
    (
        proptest::sample::select(HealthStatus::ALL.to_vec()),
        any::<String>(),
        proptest::option::of(timestamp()),
    )
        .prop_map(|(status, output, checked_at)| Health {
            status,
            output,
            checked_at,
        })
}

fn round_trips<T>(value: &T) -> Result<(), TestCaseError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let text = serde_json::to_string(value).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back: T = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, value, "through {}", text);
    Ok(())
}

proptest! {
    #[test]
    fn timestamps_round_trip_through_their_text(t in timestamp()) {
        let text = t.to_string();
        prop_assert_eq!(text.len(), "2025-10-27T12:00:30.000Z".len());
        prop_assert_eq!(text.parse::<Timestamp>().ok(), Some(t));
    }

    #[test]
    fn an_offset_names_the_same_instant(t in (86_400_000u64..MAX_MILLIS - 86_400_000), minutes in -1439i64..=1439) {
        // Render the instant in a local time `minutes` east of UTC, with that offset.
        let shifted = (t as i64 + minutes * 60_000) as u64;
        let utc = Timestamp::from_millis(shifted).to_string();
        let sign = if minutes < 0 { '-' } else { '+' };
        let text = format!(
            "{}{sign}{:02}:{:02}",
            &utc[..utc.len() - 1],
            minutes.abs() / 60,
            minutes.abs() % 60
        );
        prop_assert_eq!(text.parse::<Timestamp>().ok(), Some(Timestamp::from_millis(t)), "{}", text);
    }

    #[test]
    fn parsing_any_text_never_panics(text in any::<String>()) {
        let _ = text.parse::<Timestamp>();
    }

    #[test]
    fn service_records_round_trip(record in service_record()) {
        round_trips(&record)?;
    }

    #[test]
    fn list_answers_round_trip(
        services in prop::collection::vec(service_record(), 0..4),
        next_cursor in proptest::option::of(ulid().prop_map(|id| id.to_string())),
    ) {
        round_trips(&ListResponse { count: services.len(), services, next_cursor })?;
    }

    #[test]
    fn register_requests_round_trip(
        id in proptest::option::of(any::<String>()),
        url in any::<String>(),
        info in service_info(),
        lease in proptest::option::of(any::<bool>()),
    ) {
        round_trips(&RegisterRequest {
            id,
            url,
            info,
            lease,
            check: None,
        })?;
    }

    #[test]
    fn register_answers_round_trip(
        id in ulid(),
        status in prop_oneof![
            Just(RegistrationStatus::Registered),
            Just(RegistrationStatus::Updated),
            "[a-z]{0,10}".prop_map(RegistrationStatus::Other),
        ],
        service_url in any::<String>(),
        message in any::<String>(),
        ttl_seconds in any::<u64>(),
        ping_url in any::<String>(),
        lease_token in proptest::option::of("[0-9a-f]{64}"),
    ) {
        // "registered" and "updated" read back as the named variants, not as `Other`.
        let status = match status {
            RegistrationStatus::Other(s) if s == "registered" => RegistrationStatus::Registered,
            RegistrationStatus::Other(s) if s == "updated" => RegistrationStatus::Updated,
            s => s,
        };
        let lease_token = lease_token.map(LeaseToken::new);
        round_trips(&RegisterResponse { id, status, service_url, message, ttl_seconds, ping_url, lease_token })?;
    }

    #[test]
    fn problems_round_trip(
        kind in any::<String>(),
        title in any::<String>(),
        status in 100u16..600,
        detail in proptest::option::of(any::<String>()),
        instance in proptest::option::of(any::<String>()),
    ) {
        round_trips(&Problem { kind, title, status, detail, instance })?;
    }

    #[test]
    fn canonical_urls_are_fixed_points(text in any::<String>()) {
        if let Ok(url) = canonical_url(&text) {
            prop_assert_eq!(canonical_url(&url), Ok(url.clone()));
            prop_assert!(url.starts_with("http://") || url.starts_with("https://"), "{}", url);
        }
    }

    #[test]
    fn spellings_of_one_url_are_one_registration(
        https in any::<bool>(),
        host in "[a-z][a-z0-9-]{0,20}(\\.[a-z]{2,6}){0,2}",
        port in proptest::option::of(1u16..),
        path in "(/[a-zA-Z0-9._~-]{1,8}){0,3}",
        upper_scheme in any::<bool>(),
        upper_host in any::<bool>(),
        explicit_default_port in any::<bool>(),
        trailing_slash in any::<bool>(),
        padding in "[ \t]{0,2}",
    ) {
        let scheme = if https { "https" } else { "http" };
        let default_port = if https { 443 } else { 80 };
        let port = port.filter(|&p| p != default_port);
        let plain = format!(
            "{scheme}://{host}{}{path}",
            port.map(|p| format!(":{p}")).unwrap_or_default()
        );
        let spelled = format!(
            "{padding}{}://{}{}{path}{}{padding}",
            if upper_scheme { scheme.to_uppercase() } else { scheme.to_owned() },
            if upper_host { host.to_uppercase() } else { host.clone() },
            match (port, explicit_default_port) {
                (Some(p), _) => format!(":{p}"),
                (None, true) => format!(":{default_port}"),
                (None, false) => String::new(),
            },
            if trailing_slash && path.is_empty() { "/" } else { "" },
        );
        let canonical = canonical_url(&plain);
        prop_assert!(canonical.is_ok(), "{} rejected: {:?}", plain, canonical);
        prop_assert_eq!(canonical_url(&spelled), canonical, "{} vs {}", spelled, plain);
    }
}

proptest! {
    // Every case starts an API and sends it one request: fewer cases than the pure properties.
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever a client sends, the handler answers without panicking, never with a 5xx
    /// (the in-memory store cannot fail), and every error is problem+json.
    #[test]
    fn the_handler_answers_any_request_with_a_problem_or_success(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        runtime.block_on(harness::check(&data)).map_err(TestCaseError::fail)?;
    }
}

/// Sends `req` to `api` and returns the status and the JSON answer.
async fn call(
    api: &servicekit_orchestrator::api::Api<servicekit_orchestrator::store::MemoryStore>,
    req: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<(http::StatusCode, Value), String> {
    use http_body_util::BodyExt;
    let response = api.handle(req).await;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let json = serde_json::from_slice(&body).map_err(|e| format!("{status}: {e}"))?;
    Ok((status, json))
}

/// Registers one service per name, then asks for each name and each info field through the
/// query string: parsing the filter (percent- and plus-decoding included) and matching it
/// must find exactly the services that carry that value.
async fn filters_find_what_was_registered(services: Vec<(String, String)>) -> Result<(), String> {
    use servicekit_orchestrator::{api::Api, store::MemoryStore};
    use std::net::{Ipv4Addr, SocketAddr};
    let api = Api::new(
        MemoryStore::new(std::time::Duration::from_secs(30)),
        None,
        None,
        64 * 1024,
        SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
    );
    for (i, (name, team)) in services.iter().enumerate() {
        let body = serde_json::json!({
            "url": format!("http://svc-{i}.example"),
            "info": {"display_name": name, "team": team},
        });
        let req = http::Request::post("/services/$register")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .map_err(|e| e.to_string())?;
        let (status, answer) = call(&api, req).await?;
        if !status.is_success() {
            return Err(format!("register {name:?}: {status} {answer}"));
        }
    }
    let expect = |key: &str, value: &str| -> usize {
        services
            .iter()
            .filter(|(name, team)| match key {
                // Leading and trailing white space is not part of a display name.
                "display_name" => name.trim() == value,
                _ => team == value,
            })
            .count()
    };
    for (name, team) in &services {
        for (key, value) in [("display_name", name.trim()), ("info.team", team.as_str())] {
            let query: String = url::form_urlencoded::Serializer::new(String::new())
                .append_pair(key, value)
                .finish();
            let req = http::Request::get(format!("/services?{query}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .map_err(|e| e.to_string())?;
            let (status, answer) = call(&api, req).await?;
            let count = answer["services"].as_array().map(Vec::len);
            if status != http::StatusCode::OK || count != Some(expect(key, value)) {
                return Err(format!(
                    "?{query}: {status}, {count:?} services, expected {}: {answer}",
                    expect(key, value)
                ));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn list_filters_find_exactly_the_matching_services(
        // A small alphabet with the characters a query string must escape, so names collide
        // and decoding matters.
        services in prop::collection::vec(("[ab&=+%# é\u{1F600}]{1,4}", "[xy&=+ ]{0,3}"), 1..6)
            .prop_filter("display names are not blank", |s| s.iter().all(|(n, _)| !n.trim().is_empty())),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        runtime
            .block_on(filters_find_what_was_registered(services))
            .map_err(TestCaseError::fail)?;
    }
}
