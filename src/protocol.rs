//! The wire contract between services and the orchestrator.
//!
//! Both sides compile against these types, so the JSON a client sends is by construction the
//! JSON the orchestrator parses. The shapes follow the reference orchestrator (see the README's
//! HTTP API section): field names, status strings and problem `type` URNs are part of the
//! contract and must not change casually.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use ulid::Ulid;

/// Path of the registration endpoint, relative to the orchestrator's base URL.
pub const REGISTER_PATH: &str = "/services/$register";

/// Header that carries the registration key (the reference client's header).
pub const SERVICE_KEY_HEADER: &str = "x-service-key";

/// Media type of every error body (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A point in time on the wire: RFC 3339, UTC, millisecond precision, `Z` suffix.
///
/// Stored as milliseconds since the Unix epoch so stores can keep it as an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    /// Builds a timestamp from milliseconds since the Unix epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    /// The current wall-clock time.
    pub fn now() -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Timestamp(ms)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// This time plus `d` (saturating).
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(d.as_millis() as u64))
    }

    /// The same instant as a [`SystemTime`].
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&humantime::format_rfc3339_millis(self.to_system_time()), f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let t = humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)?;
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map_err(|_| serde::de::Error::custom("timestamp before 1970"))?
            .as_millis();
        Ok(Timestamp(ms as u64))
    }
}

/// What a service says about itself: a display name, optional version and description, and
/// any further metadata fields, which are kept exactly as given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Human-readable name; also the key of the orchestrator's by-name index.
    pub display_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Every other top-level field (`team`, `capabilities`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ServiceInfo {
    /// Info with only a display name.
    pub fn new(display_name: impl Into<String>) -> Self {
        ServiceInfo {
            display_name: display_name.into(),
            version: None,
            description: None,
            extra: Map::new(),
        }
    }
}

/// `POST /services/$register` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The id this instance had before, so it keeps its identity after its entry expired.
    /// Anything that is not a string (or not a ULID, such as the reference client's slug)
    /// is ignored by the orchestrator.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_id"
    )]
    pub id: Option<String>,
    /// Absolute `http`/`https` URL under which the service answers.
    pub url: String,
    pub info: ServiceInfo,
}

fn lenient_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => Some(s),
        _ => None,
    })
}

/// Whether a registration created a new entry or refreshed an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationStatus {
    /// A new entry (HTTP 201).
    Registered,
    /// The URL was already registered: same id, info replaced, TTL restarted (HTTP 200).
    Updated,
}

/// Answer to a registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub id: Ulid,
    pub status: RegistrationStatus,
    pub service_url: String,
    pub message: String,
    pub ttl_seconds: u64,
    pub ping_url: String,
}

/// Answer to `PUT /services/{id}/$ping`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingResponse {
    pub id: Ulid,
    /// Always `"alive"`.
    pub status: String,
    pub last_ping_at: Timestamp,
    pub expires_at: Timestamp,
}

/// A stored registration, as `GET /services/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub id: Ulid,
    pub url: String,
    pub info: ServiceInfo,
    pub registered_at: Timestamp,
    pub last_updated: Timestamp,
    pub last_ping_at: Timestamp,
    pub expires_at: Timestamp,
}

/// Answer to `GET /services`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListResponse {
    pub count: usize,
    pub services: Vec<ServiceRecord>,
}

/// Answer to `DELETE /services/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeregisterResponse {
    /// Always `"deregistered"`.
    pub status: String,
    pub service: ServiceRecord,
}

/// Answer to `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthResponse {
    /// `"healthy"` (HTTP 200) or `"unhealthy"` (HTTP 503).
    pub status: String,
    pub checks: Map<String, Value>,
}

/// The stable `type` URNs of the orchestrator's problem details.
pub mod problem_type {
    pub const BAD_REQUEST: &str = "urn:servicekit:error:bad-request";
    pub const UNAUTHORIZED: &str = "urn:servicekit:error:unauthorized";
    pub const NOT_FOUND: &str = "urn:servicekit:error:not-found";
    pub const METHOD_NOT_ALLOWED: &str = "urn:servicekit:error:method-not-allowed";
    pub const REQUEST_TIMEOUT: &str = "urn:servicekit:error:request-timeout";
    pub const PAYLOAD_TOO_LARGE: &str = "urn:servicekit:error:payload-too-large";
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "urn:servicekit:error:unsupported-media-type";
    pub const STORE_UNAVAILABLE: &str = "urn:servicekit:error:store-unavailable";
    pub const INTERNAL: &str = "urn:servicekit:error:internal";
}

/// An RFC 9457 problem details object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.title)?;
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_millis() {
        let t = Timestamp::from_millis(1_761_566_430_000);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2025-10-27T12:00:30.000Z\"");
        let back: Timestamp = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn info_keeps_unknown_fields_and_omits_absent_options() {
        let json = r#"{"display_name":"A","team":"data","capabilities":["x"],"priority":5}"#;
        let info: ServiceInfo = serde_json::from_str(json).unwrap();
        assert_eq!(info.display_name, "A");
        assert_eq!(info.version, None);
        assert_eq!(info.extra["priority"], 5);
        let again: Value = serde_json::to_value(&info).unwrap();
        assert_eq!(again, serde_json::from_str::<Value>(json).unwrap());
    }

    #[test]
    fn register_request_ignores_non_string_ids() {
        let r: RegisterRequest =
            serde_json::from_str(r#"{"id":7,"url":"http://a","info":{"display_name":"A"}}"#)
                .unwrap();
        assert_eq!(r.id, None);
        let r: RegisterRequest =
            serde_json::from_str(r#"{"id":"svc-a","url":"http://a","info":{"display_name":"A"}}"#)
                .unwrap();
        assert_eq!(r.id.as_deref(), Some("svc-a"));
    }

    #[test]
    fn problem_serializes_type_field() {
        let p = Problem {
            kind: problem_type::NOT_FOUND.into(),
            title: "Resource Not Found".into(),
            status: 404,
            detail: None,
            instance: Some("/services/x".into()),
        };
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["type"], "urn:servicekit:error:not-found");
        assert!(v.get("detail").is_none());
    }
}
