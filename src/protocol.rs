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

pub mod health;

pub use health::{
    CheckSpec, CheckTarget, Health, HealthReport, HealthStatus, HealthStatusError, CHECK_FIELDS,
    MAX_HEALTH_OUTPUT,
};

/// Path of the registration endpoint, relative to the orchestrator's base URL.
pub const REGISTER_PATH: &str = "/services/$register";

/// Header that carries the registration key (the reference client's header).
pub const SERVICE_KEY_HEADER: &str = "x-service-key";

/// Header that carries a registration's lease token on ping, deregister and re-register.
pub const LEASE_TOKEN_HEADER: &str = "x-lease-token";

/// Header that carries the orchestrator's admin key, which may do any write.
pub const ADMIN_KEY_HEADER: &str = "x-admin-key";

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

impl From<SystemTime> for Timestamp {
    /// Truncated to the millisecond; times before 1970 become 1970.
    fn from(t: SystemTime) -> Self {
        let ms = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0 % 1000;
        let secs = self.0 / 1000;
        let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
        let rem = secs % 86_400;
        write!(
            f,
            "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
            rem / 3600,
            rem / 60 % 60,
            rem % 60
        )
    }
}

impl std::str::FromStr for Timestamp {
    type Err = TimestampError;

    /// Parses RFC 3339: `2025-10-27T12:00:30Z`, with any fraction (kept to the millisecond)
    /// and any offset (`+02:00`, `-05:30`, `Z`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_rfc3339(text).ok_or_else(|| TimestampError(text.chars().take(64).collect()))
    }
}

/// A timestamp that is not RFC 3339, or lies before 1970.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an RFC 3339 timestamp after 1970: {0:?}")]
pub struct TimestampError(String);

fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let digits = b.get(from..from + len)?;
        digits.iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    };
    let sep = |at: usize, options: &[u8]| b.get(at).is_some_and(|c| options.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month)
        || day < 1
        || day > month_days[(month - 1) as usize]
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut at = 19;
    let mut millis = 0;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 3 {
                millis = millis * 10 + i64::from(b[at] - b'0');
            }
            at += 1;
        }
        let digits = at - start;
        if digits == 0 {
            return None;
        }
        millis *= 10i64.pow(3u32.saturating_sub(digits as u32));
    }
    let offset_minutes = match b.get(at)? {
        b'Z' | b'z' if at + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if at + 6 == b.len() && sep(at + 3, b":") => {
            let (h, m) = (num(at + 1, 2)?, num(at + 4, 2)?);
            if h > 23 || m > 59 {
                return None;
            }
            let minutes = h * 60 + m;
            if *sign == b'-' {
                -minutes
            } else {
                minutes
            }
        }
        _ => return None,
    };
    // A leap second (":60") counts as the last millisecond-precise second of the minute.
    let second = second.min(59);
    let days = days_from_civil(year, month, day);
    let ms = ((days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60) * 1000)
        + millis;
    u64::try_from(ms).ok().map(Timestamp)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (the inverse of [`days_from_civil`]).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a service says about itself: a display name, optional version and description, and
/// any further metadata fields, which are kept exactly as given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Human-readable name; also the key of the orchestrator's by-name index.
    pub display_name: String,
    /// The service's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// What the service does.
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

    /// The same info with `version` set.
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
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
    /// What the service says about itself.
    pub info: ServiceInfo,
    /// `Some(true)` asks for a lease: the answer carries a [`LeaseToken`] that every later
    /// write of this entry must present. Left out when not set, as the reference client does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<bool>,
    /// A check for the orchestrator to run on the instance (see [`CheckSpec`]). Left out when
    /// not set; an orchestrator without health support ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSpec>,
}

/// The secret of a leased registration, as the orchestrator hands it out (`lease_token`) and
/// clients present it (`X-Lease-Token`). Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseToken(String);

impl LeaseToken {
    /// Wraps a token's text.
    pub fn new(token: impl Into<String>) -> Self {
        LeaseToken(token.into())
    }

    /// The token's text, to put in a header. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseToken(***)")
    }
}

fn lenient_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => Some(s),
        _ => None,
    })
}

/// Whether a registration created a new entry or refreshed an existing one.
///
/// Clients accept any status string a compatible orchestrator may send ([`Other`](Self::Other)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistrationStatus {
    /// A new entry (HTTP 201).
    Registered,
    /// The URL was already registered: same id, info replaced, TTL restarted (HTTP 200).
    Updated,
    /// A status this version does not know, as sent.
    Other(String),
}

impl RegistrationStatus {
    /// The wire text: `"registered"`, `"updated"`, or the unknown status as sent.
    pub fn as_str(&self) -> &str {
        match self {
            RegistrationStatus::Registered => "registered",
            RegistrationStatus::Updated => "updated",
            RegistrationStatus::Other(s) => s,
        }
    }
}

impl Serialize for RegistrationStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RegistrationStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(match text.as_str() {
            "registered" => RegistrationStatus::Registered,
            "updated" => RegistrationStatus::Updated,
            _ => RegistrationStatus::Other(text),
        })
    }
}

fn unknown_status() -> RegistrationStatus {
    RegistrationStatus::Other(String::new())
}

/// The TTL a client assumes when an answer does not say (the reference default).
pub const DEFAULT_TTL_SECONDS: u64 = 30;

fn default_ttl_seconds() -> u64 {
    DEFAULT_TTL_SECONDS
}

/// Answer to a registration. Only `id` is required when reading one: a compatible
/// orchestrator that leaves the rest out gets the defaults (an unknown status, a
/// [`DEFAULT_TTL_SECONDS`] TTL, and a ping URL the client derives from the id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// The id of the entry.
    pub id: Ulid,
    /// Whether the entry is new.
    #[serde(default = "unknown_status")]
    pub status: RegistrationStatus,
    /// The URL as stored (canonical form).
    #[serde(default)]
    pub service_url: String,
    /// A human-readable summary.
    #[serde(default)]
    pub message: String,
    /// How long the entry lives without a ping.
    #[serde(default = "default_ttl_seconds")]
    pub ttl_seconds: u64,
    /// Where to send pings; empty when the orchestrator did not say.
    #[serde(default)]
    pub ping_url: String,
    /// The lease token, when the registration asked for a lease and the orchestrator grants
    /// them (the reference orchestrator does not: then it is absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_token: Option<LeaseToken>,
}

/// Answer to `PUT /services/{id}/$ping`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingResponse {
    /// The id of the entry.
    pub id: Ulid,
    /// Always `"alive"`.
    pub status: String,
    /// When this ping arrived.
    pub last_ping_at: Timestamp,
    /// When the entry expires unless pinged again.
    pub expires_at: Timestamp,
}

/// A stored registration, as `GET /services/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The id of the entry.
    pub id: Ulid,
    /// The service's URL (canonical form).
    pub url: String,
    /// What the service says about itself.
    pub info: ServiceInfo,
    /// When the entry was first created (kept across re-registrations of the URL).
    pub registered_at: Timestamp,
    /// When the entry was last registered.
    pub last_updated: Timestamp,
    /// When the entry was last registered or pinged.
    pub last_ping_at: Timestamp,
    /// When the entry expires unless pinged.
    pub expires_at: Timestamp,
    /// How the instance is doing; `passing` until a report or a check says otherwise (and
    /// when an orchestrator without health support leaves it out).
    #[serde(default)]
    pub health: Health,
    /// The check the orchestrator runs on the instance, when its registration declared one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSpec>,
}

/// Answer to `GET /services`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListResponse {
    /// How many records follow.
    pub count: usize,
    /// The records, in registration order.
    pub services: Vec<ServiceRecord>,
    /// Present when the request asked for a page (`?limit=N`) and more records remain: pass
    /// it as `?cursor=` (with the same filters) for the next page. Opaque.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Query parameter that turns `GET /services` into the watch feed: `?watch=true`, with the
/// list's filters (`display_name`, `url`, `info.FIELD`).
pub const WATCH_PARAM: &str = "watch";

/// Media type of the watch feed (Server-Sent Events).
pub const EVENT_STREAM: &str = "text/event-stream";

/// Header a reconnecting watcher sends with the `id:` of the last event it received, so the
/// orchestrator can send only what it missed (or a fresh snapshot when it no longer can).
pub const LAST_EVENT_ID_HEADER: &str = "last-event-id";

/// The longest a watch feed stays silent: the orchestrator writes a comment line at least
/// this often, so a watcher that hears nothing for much longer knows its connection is dead.
pub const WATCH_HEARTBEAT: Duration = Duration::from_secs(15);

/// The `event:` of a watch feed message.
///
/// A watcher applies them in order: `snapshot` replaces everything it knows with the list in
/// its data; `registered` and `updated` insert or replace one record (by `id`);
/// `deregistered` and `expired` remove one (an id it does not know is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WatchEventKind {
    /// The whole current list for the filter: data is a [`ListResponse`].
    Snapshot,
    /// A new entry: data is its [`ServiceRecord`].
    Registered,
    /// An entry registered again (new info, or the same): data is its [`ServiceRecord`].
    Updated,
    /// An entry removed by its service (or an admin): data is a [`RemovedService`].
    Deregistered,
    /// An entry whose TTL ran out: data is a [`RemovedService`].
    Expired,
}

impl WatchEventKind {
    /// Every kind, in declaration order.
    pub const ALL: [WatchEventKind; 5] = [
        WatchEventKind::Snapshot,
        WatchEventKind::Registered,
        WatchEventKind::Updated,
        WatchEventKind::Deregistered,
        WatchEventKind::Expired,
    ];

    /// The `event:` field's text.
    pub const fn as_str(self) -> &'static str {
        match self {
            WatchEventKind::Snapshot => "snapshot",
            WatchEventKind::Registered => "registered",
            WatchEventKind::Updated => "updated",
            WatchEventKind::Deregistered => "deregistered",
            WatchEventKind::Expired => "expired",
        }
    }

    /// The kind an `event:` field names; `None` for a name this version does not know (a
    /// watcher skips such events).
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// Whether the event removes an entry.
    pub const fn is_removal(self) -> bool {
        matches!(self, WatchEventKind::Deregistered | WatchEventKind::Expired)
    }
}

impl fmt::Display for WatchEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The data of a `deregistered` or `expired` watch event: the last known record of the entry.
/// Only `id` and `url` are sure to be there; the orchestrator sends the whole record when it
/// has it (a Valkey-backed orchestrator that saw an entry expire may know only its id, URL
/// and display name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemovedService {
    /// The id of the removed entry.
    pub id: Ulid,
    /// Its URL.
    pub url: String,
    /// What it said about itself, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<ServiceInfo>,
    /// When it would have expired (for `deregistered`) or expired, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
}

impl From<&ServiceRecord> for RemovedService {
    fn from(record: &ServiceRecord) -> Self {
        RemovedService {
            id: record.id,
            url: record.url.clone(),
            info: Some(record.info.clone()),
            expires_at: Some(record.expires_at),
        }
    }
}

/// Answer to `DELETE /services/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeregisterResponse {
    /// Always `"deregistered"`.
    pub status: String,
    /// The record as it was.
    pub service: ServiceRecord,
}

/// Answer to `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthResponse {
    /// `"healthy"` (HTTP 200), `"degraded"` (HTTP 503: the store answers but refuses writes)
    /// or `"unhealthy"` (HTTP 503: the store does not answer).
    pub status: String,
    /// One entry per dependency (`store`).
    pub checks: Map<String, Value>,
}

/// The stable `type` URNs of the orchestrator's problem details.
pub mod problem_type {
    /// Malformed JSON, an invalid `url` or `display_name`, an unknown query parameter.
    pub const BAD_REQUEST: &str = "urn:servicekit:error:bad-request";
    /// A write without the configured registration key.
    pub const UNAUTHORIZED: &str = "urn:servicekit:error:unauthorized";
    /// A write of a leased entry without its lease token (`X-Lease-Token`) or the admin key.
    pub const FORBIDDEN: &str = "urn:servicekit:error:forbidden";
    /// An unknown or expired id (or one that is not a canonical ULID), or an unknown route.
    pub const NOT_FOUND: &str = "urn:servicekit:error:not-found";
    /// A known route with the wrong method (the answer has `Allow`).
    pub const METHOD_NOT_ALLOWED: &str = "urn:servicekit:error:method-not-allowed";
    /// The request body did not arrive in time.
    pub const REQUEST_TIMEOUT: &str = "urn:servicekit:error:request-timeout";
    /// The request body is larger than the orchestrator takes.
    pub const PAYLOAD_TOO_LARGE: &str = "urn:servicekit:error:payload-too-large";
    /// The request target (path and query) is longer than the orchestrator takes.
    pub const URI_TOO_LONG: &str = "urn:servicekit:error:uri-too-long";
    /// The request's header section is larger than the orchestrator takes.
    pub const HEADER_FIELDS_TOO_LARGE: &str = "urn:servicekit:error:header-fields-too-large";
    /// A body whose `Content-Type` is not JSON.
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "urn:servicekit:error:unsupported-media-type";
    /// A limit was reached: `info` too large (413), the registry full for new URLs (507), too
    /// many listings at once (429, with `Retry-After`).
    pub const LIMIT_EXCEEDED: &str = "urn:servicekit:error:limit-exceeded";
    /// The store did not answer in time (the answer has `Retry-After`).
    pub const STORE_UNAVAILABLE: &str = "urn:servicekit:error:store-unavailable";
    /// The store returned data the orchestrator cannot read (a bug).
    pub const INTERNAL: &str = "urn:servicekit:error:internal";
}

/// An RFC 9457 problem details object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// A stable URN from [`problem_type`].
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the problem type.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The request it happened to.
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
    fn watch_event_names_round_trip() {
        for kind in WatchEventKind::ALL {
            assert_eq!(WatchEventKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(WatchEventKind::parse("bookmark"), None);
        assert!(WatchEventKind::Expired.is_removal());
        assert!(!WatchEventKind::Updated.is_removal());
    }

    #[test]
    fn a_removal_reads_a_whole_record_or_just_id_and_url() {
        let record = ServiceRecord {
            id: Ulid::from_string("01JB0000000000000000000000").unwrap(),
            url: "http://a:1".into(),
            info: ServiceInfo::new("svca"),
            registered_at: Timestamp::from_millis(1),
            last_updated: Timestamp::from_millis(2),
            last_ping_at: Timestamp::from_millis(3),
            expires_at: Timestamp::from_millis(4),
            health: Health::default(),
            check: None,
        };
        let whole: RemovedService =
            serde_json::from_value(serde_json::to_value(&record).unwrap()).unwrap();
        assert_eq!(whole, RemovedService::from(&record));
        let least: RemovedService =
            serde_json::from_str(r#"{"id":"01JB0000000000000000000000","url":"http://a:1"}"#)
                .unwrap();
        assert_eq!(
            (least.id, least.info, least.expires_at),
            (record.id, None, None)
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc_millis() {
        let t = Timestamp::from_millis(1_761_566_430_000);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2025-10-27T12:00:30.000Z\"");
        let back: Timestamp = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn timestamps_format_across_the_calendar() {
        for (ms, text) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (4_107_542_399_999, "2100-02-28T23:59:59.999Z"),
            (1_761_566_430_123, "2025-10-27T12:00:30.123Z"),
        ] {
            assert_eq!(Timestamp::from_millis(ms).to_string(), text);
            assert_eq!(
                text.parse::<Timestamp>(),
                Ok(Timestamp::from_millis(ms)),
                "{text}"
            );
        }
    }

    #[test]
    fn timestamps_with_any_offset_or_fraction_parse_to_the_same_instant() {
        let t = Timestamp::from_millis(1_761_566_430_000);
        for text in [
            "2025-10-27T12:00:30Z",
            "2025-10-27T12:00:30.000Z",
            "2025-10-27t12:00:30z",
            "2025-10-27T14:00:30+02:00",
            "2025-10-27T14:00:30.0000+02:00",
            "2025-10-27T06:30:30-05:30",
            "2025-10-27 12:00:30+00:00",
        ] {
            assert_eq!(text.parse::<Timestamp>(), Ok(t), "{text}");
        }
        assert_eq!(
            "2025-10-27T14:00:30.123456+02:00".parse::<Timestamp>(),
            Ok(Timestamp::from_millis(1_761_566_430_123))
        );
        for bad in [
            "",
            "2025-10-27",
            "2025-10-27T12:00:30",
            "2025-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2025-10-27T24:00:00Z",
            "2025-10-27T12:00:30.Z",
            "2025-10-27T12:00:30+0200",
            "2025-10-27T12:00:30Zjunk",
            "1969-12-31T23:59:59Z",
        ] {
            assert!(bad.parse::<Timestamp>().is_err(), "{bad}");
        }
    }

    #[test]
    fn register_answers_need_only_an_id() {
        let r: RegisterResponse =
            serde_json::from_str(r#"{"id":"01JDQ9J4XWAZ3M5S1X2VQ7N8C4","status":"renewed"}"#)
                .unwrap();
        assert_eq!(r.status, RegistrationStatus::Other("renewed".into()));
        assert_eq!(r.ttl_seconds, DEFAULT_TTL_SECONDS);
        assert_eq!(r.ping_url, "");
        let json = serde_json::to_value(RegistrationStatus::Updated).unwrap();
        assert_eq!(json, "updated");
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
    fn lease_fields_are_left_out_unless_set_and_the_token_never_shows() {
        let request = RegisterRequest {
            id: None,
            url: "http://a".into(),
            info: ServiceInfo::new("A"),
            lease: None,
            check: None,
        };
        let json = serde_json::to_value(&request).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"url": "http://a", "info": {"display_name": "A"}}),
            "the reference client's body, byte for byte"
        );
        let leased = RegisterRequest {
            lease: Some(true),
            ..request
        };
        assert_eq!(serde_json::to_value(&leased).unwrap()["lease"], true);
        let r: RegisterResponse = serde_json::from_str(
            r#"{"id":"01JDQ9J4XWAZ3M5S1X2VQ7N8C4","lease_token":"hunter2-token"}"#,
        )
        .unwrap();
        let token = r.lease_token.clone().expect("token");
        assert_eq!(token.expose(), "hunter2-token");
        assert!(!format!("{r:?}").contains("hunter2"), "{r:?}");
        assert_eq!(
            serde_json::to_value(&r).unwrap()["lease_token"],
            "hunter2-token"
        );
        let unleased = RegisterResponse {
            lease_token: None,
            ..r
        };
        assert!(serde_json::to_value(&unleased)
            .unwrap()
            .get("lease_token")
            .is_none());
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
