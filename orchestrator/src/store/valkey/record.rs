//! The record codec: one string per registration, a fixed-width header of four timestamps,
//! then the length-prefixed URL and display name, the length-prefixed lease hash of a leased
//! record, the tagged health and check of a record that has them, and the info JSON (see
//! `docs/valkey-store.md`). Never panics on a malformed value. The constants here are the one
//! statement of the layout: the Lua scripts get them from a prelude rendered from them.

use std::time::Duration;

use fred::types::Value;
use servicekit::protocol::{
    CheckSpec, Health, HealthStatus, ServiceInfo, ServiceRecord, Timestamp,
};
use ulid::Ulid;

use crate::store::StoreError;

/// Digits of every header timestamp of a record.
pub(super) const STAMP_DIGITS: usize = 13;
/// Length of a record's header, the four timestamps; its URL starts right after.
pub(super) const HEADER_LEN: usize = 4 * STAMP_DIGITS;
/// Byte offset of `last_ping_at`: a ping rewrites it and `expires_at`, up to the header's end.
pub(super) const PING_OFFSET: usize = 2 * STAMP_DIGITS;
/// The longest TTL accepted, so that expiries fit the 13 header digits (see `lua/record.lua`)
/// until past the year 2180.
pub(super) const MAX_TTL: Duration = Duration::from_secs(100 * 366 * 24 * 3600);

/// The tag before the health field, present only when the health is not the default one.
pub(super) const HEALTH_TAG: u8 = b'h';
/// The tag before the check field (the check's JSON), present only when there is a check.
pub(super) const CHECK_TAG: u8 = b'c';
/// The letter of each status at the start of the health field's text.
const STATUS_LETTERS: [(HealthStatus, u8); 3] = [
    (HealthStatus::Passing, b'p'),
    (HealthStatus::Warning, b'w'),
    (HealthStatus::Critical, b'c'),
];

/// The letter of `status` in a health field.
pub(super) fn status_letter(status: HealthStatus) -> u8 {
    STATUS_LETTERS
        .iter()
        .find(|(s, _)| *s == status)
        .map_or(b'p', |&(_, letter)| letter)
}

/// The health field of a record: the tag, then, length-prefixed, the status letter, the
/// `checked_at` milliseconds (no digits when unset), `:` and the output. Empty for the default
/// health, so records nothing reported on cost no byte more.
pub(super) fn health_field(health: &Health) -> String {
    if health.is_unreported() {
        return String::new();
    }
    let at = health
        .checked_at
        .map(|t| t.as_millis().to_string())
        .unwrap_or_default();
    let text = format!(
        "{}{at}:{}",
        char::from(status_letter(health.status)),
        health.output
    );
    format!("{}{}:{text}", char::from(HEALTH_TAG), text.len())
}

/// The check field of a record: the tag and the length-prefixed JSON of the check; empty
/// when there is none.
pub(super) fn check_field(check: Option<&CheckSpec>) -> Result<String, StoreError> {
    let Some(check) = check else {
        return Ok(String::new());
    };
    let json = serde_json::to_string(check)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode the check: {e}")))?;
    Ok(format!("{}{}:{json}", char::from(CHECK_TAG), json.len()))
}

/// The health a record's health field holds, borrowing its output.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawHealth<'a> {
    pub(super) status: HealthStatus,
    pub(super) checked_at: Option<u64>,
    pub(super) output: &'a str,
}

impl<'a> RawHealth<'a> {
    /// Splits a health field's text (after its tag and length).
    fn parse(text: &'a str) -> Result<RawHealth<'a>, String> {
        // Upper-case: a status change not yet known to be in the change log (health.lua).
        let first = text.as_bytes().first().map(u8::to_ascii_lowercase);
        let status = STATUS_LETTERS
            .iter()
            .find(|&&(_, letter)| Some(letter) == first)
            .map(|&(s, _)| s)
            .ok_or_else(|| format!("unknown health status letter in {:?}", trimmed(text)))?;
        // The letter is ASCII, so index 1 is a character boundary.
        let rest = &text[1..];
        let (digits, output) = rest
            .split_once(':')
            .ok_or_else(|| "no ':' after the health's checked_at".to_owned())?;
        let checked_at = if digits.is_empty() {
            None
        } else if digits.len() <= STAMP_DIGITS + 7 && digits.bytes().all(|b| b.is_ascii_digit()) {
            Some(
                digits
                    .parse::<u64>()
                    .map_err(|e| format!("bad health checked_at: {e}"))?,
            )
        } else {
            return Err(format!("bad health checked_at {:?}", trimmed(digits)));
        };
        Ok(RawHealth {
            status,
            checked_at,
            output,
        })
    }

    fn to_health(&self) -> Health {
        Health {
            status: self.status,
            output: self.output.to_owned(),
            checked_at: self.checked_at.map(Timestamp::from_millis),
        }
    }
}

/// At most 32 characters of `text`, for an error message.
fn trimmed(text: &str) -> String {
    text.chars().take(32).collect()
}

/// The optional tagged field (`tag`, then length-prefixed text) at the start of `v`, and what
/// follows it.
fn tagged<'a>(v: &'a [u8], tag: u8, what: &str) -> Result<(Option<&'a str>, &'a [u8]), String> {
    match v.split_first() {
        Some((&b, rest)) if b == tag => {
            let (text, rest) = length_prefixed(rest, what)?;
            Ok((Some(text), rest))
        }
        _ => Ok((None, v)),
    }
}

/// The health a whole health field (as [`health_field`] writes it, `""` for the default)
/// holds.
pub(super) fn health_from_field(field: &[u8]) -> Result<Health, String> {
    let (text, rest) = tagged(field, HEALTH_TAG, "health")?;
    if !rest.is_empty() {
        return Err("bytes after the health field".into());
    }
    match text {
        Some(text) => RawHealth::parse(text).map(|raw| raw.to_health()),
        None => Ok(Health::default()),
    }
}

/// The part of a record after the header that the caller encodes: the URL and the display
/// name with their byte lengths. The register script appends the lease field (it decides the
/// lease) and the info JSON.
pub(super) fn record_head(url: &str, name: &str) -> String {
    format!("{}:{url}{}:{name}", url.len(), name.len())
}

/// A record value split into its parts, borrowing from the value.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawRecord<'a> {
    pub(super) registered_at: u64,
    pub(super) last_updated: u64,
    pub(super) last_ping_at: u64,
    pub(super) expires_at: u64,
    pub(super) url: &'a str,
    pub(super) name: &'a str,
    /// The hex SHA-256 of the lease token, for a leased record.
    pub(super) lease: Option<&'a str>,
    /// The health, when it is not the default one.
    pub(super) health: Option<RawHealth<'a>>,
    /// The check's JSON, when the registration declared one.
    pub(super) check_json: Option<&'a str>,
    pub(super) info_json: &'a str,
}

impl<'a> RawRecord<'a> {
    /// Splits a record value; the error says what does not follow the layout. Never panics.
    pub(super) fn parse(v: &'a [u8]) -> Result<RawRecord<'a>, String> {
        if v.len() < HEADER_LEN {
            return Err(format!(
                "{} bytes, shorter than the {HEADER_LEN}-byte header",
                v.len()
            ));
        }
        let (header, body) = v.split_at(HEADER_LEN);
        let mut stamps = [0u64; 4];
        for (i, (stamp, digits)) in stamps
            .iter_mut()
            .zip(header.chunks_exact(STAMP_DIGITS))
            .enumerate()
        {
            if !digits.iter().all(u8::is_ascii_digit) {
                return Err(format!(
                    "header timestamp {i} is not {STAMP_DIGITS} digits: {:?}",
                    String::from_utf8_lossy(digits)
                ));
            }
            *stamp = digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0'));
        }
        let (url, rest) = length_prefixed(body, "url")?;
        let (name, rest) = length_prefixed(rest, "display name")?;
        // The info JSON starts with '{', so a digit here starts the lease field.
        let (lease, rest) = match rest.first() {
            Some(b) if b.is_ascii_digit() => {
                let (lease, rest) = length_prefixed(rest, "lease")?;
                (Some(lease), rest)
            }
            _ => (None, rest),
        };
        // Then the optional tagged fields, in this order: neither tag is a digit or '{'.
        let (health, rest) = tagged(rest, HEALTH_TAG, "health")?;
        let health = health.map(RawHealth::parse).transpose()?;
        let (check_json, info) = tagged(rest, CHECK_TAG, "check")?;
        let info_json = std::str::from_utf8(info).map_err(|e| format!("info is not UTF-8: {e}"))?;
        let [registered_at, last_updated, last_ping_at, expires_at] = stamps;
        Ok(RawRecord {
            registered_at,
            last_updated,
            last_ping_at,
            expires_at,
            url,
            name,
            lease,
            health,
            check_json,
            info_json,
        })
    }

    pub(super) fn into_record(self, id: Ulid) -> Result<ServiceRecord, StoreError> {
        let info: ServiceInfo = serde_json::from_str(self.info_json)
            .map_err(|e| StoreError::Corrupt(format!("record {id}: bad info JSON: {e}")))?;
        let check = self
            .check_json
            .map(serde_json::from_str::<CheckSpec>)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("record {id}: bad check JSON: {e}")))?;
        Ok(ServiceRecord {
            id,
            url: self.url.to_owned(),
            info,
            registered_at: Timestamp::from_millis(self.registered_at),
            last_updated: Timestamp::from_millis(self.last_updated),
            last_ping_at: Timestamp::from_millis(self.last_ping_at),
            expires_at: Timestamp::from_millis(self.expires_at),
            health: self
                .health
                .as_ref()
                .map_or_else(Health::default, RawHealth::to_health),
            check,
        })
    }
}

/// The `<len>:<text>` at the start of `v` and what follows it.
pub(super) fn length_prefixed<'a>(v: &'a [u8], what: &str) -> Result<(&'a str, &'a [u8]), String> {
    // Ten digits are more than any Valkey string can hold (512 MB).
    let colon = v
        .iter()
        .take(11)
        .position(|&b| b == b':')
        .ok_or_else(|| format!("no length before the {what}"))?;
    let digits = &v[..colon];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(format!(
            "bad length before the {what}: {:?}",
            String::from_utf8_lossy(digits)
        ));
    }
    let len = digits.iter().fold(0usize, |n, d| {
        n.saturating_mul(10).saturating_add(usize::from(d - b'0'))
    });
    let rest = &v[colon + 1..];
    if len > rest.len() {
        return Err(format!(
            "the {what} is {len} bytes long but only {} follow",
            rest.len()
        ));
    }
    let (text, rest) = rest.split_at(len);
    let text = std::str::from_utf8(text).map_err(|e| format!("the {what} is not UTF-8: {e}"))?;
    Ok((text, rest))
}

/// A record from a `GET` reply: `None` for a missing (expired or deleted) key,
/// [`StoreError::Corrupt`] for a value that does not follow the layout.
pub(super) fn record_from_value(id: Ulid, v: &Value) -> Result<Option<ServiceRecord>, StoreError> {
    if v.is_null() {
        return Ok(None);
    }
    let bytes = v
        .as_bytes()
        .ok_or_else(|| StoreError::Corrupt(format!("record {id}: not a string: {v:?}")))?;
    let raw =
        RawRecord::parse(bytes).map_err(|e| StoreError::Corrupt(format!("record {id}: {e}")))?;
    raw.into_record(id).map(Some)
}

/// A candidate's `expires_at` and display name from its `GET` reply (`None` when missing or
/// malformed: the sweeper treats both as dead).
pub(super) fn expiry_and_name(reply: &Value) -> (Option<u64>, Option<&str>) {
    match reply.as_bytes().map(RawRecord::parse) {
        Some(Ok(raw)) => (Some(raw.expires_at), Some(raw.name)),
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole record value as the register script writes it.
    fn value(stamps: [u64; 4], url: &str, name: &str, info_json: &str) -> Vec<u8> {
        leased_value(stamps, url, name, None, info_json)
    }

    fn leased_value(
        stamps: [u64; 4],
        url: &str,
        name: &str,
        lease: Option<&str>,
        info_json: &str,
    ) -> Vec<u8> {
        full_value(
            stamps,
            url,
            name,
            lease,
            &Health::default(),
            None,
            info_json,
        )
    }

    /// A record value with every optional field as given.
    fn full_value(
        stamps: [u64; 4],
        url: &str,
        name: &str,
        lease: Option<&str>,
        health: &Health,
        check: Option<&CheckSpec>,
        info_json: &str,
    ) -> Vec<u8> {
        let header: String = stamps.iter().map(|ms| format!("{ms:013}")).collect();
        let lease = lease.map_or(String::new(), |h| format!("{}:{h}", h.len()));
        let (health, check) = (
            health_field(health),
            check_field(check).expect("a check encodes"),
        );
        format!(
            "{header}{}{lease}{health}{check}{info_json}",
            record_head(url, name)
        )
        .into_bytes()
    }

    fn a_health() -> impl proptest::strategy::Strategy<Value = Health> {
        use proptest::prelude::*;
        (
            proptest::sample::select(HealthStatus::ALL.to_vec()),
            // Colons, digits and braces that look like layout; non-ASCII; long.
            "(.{0,8}|[0-9:{}hc]{0,12}|.{90,300})",
            proptest::option::of(0u64..10_000_000_000_000),
        )
            .prop_map(|(status, output, at)| Health {
                status,
                output,
                checked_at: at.map(Timestamp::from_millis),
            })
    }

    proptest::proptest! {
        /// Whatever the URL, the name (colons, digits, braces, non-ASCII), the lease and the
        /// info hold, a value splits back into exactly the parts it was written from.
        #[test]
        fn any_record_value_splits_into_its_parts(
            stamps in proptest::array::uniform4(0u64..10_000_000_000_000),
            // Short, length-like (digits, colons, braces) and long enough for 3-digit lengths.
            url in "(.{0,8}|[0-9:{}]{0,12}|.{90,300})",
            name in "(.{0,8}|[0-9:{}]{0,12}|.{90,300})",
            lease in proptest::option::of("[0-9a-f]{64}"),
            health in a_health(),
            check in proptest::option::of(("[/a-z0-9:{}]{0,20}", 1u64..100_000)),
            info in proptest::collection::btree_map(".*", ".*", 0..4),
        ) {
            let info_json = serde_json::to_string(&info).expect("a map of strings encodes");
            let check = check.map(|(path, every)| {
                CheckSpec::http(path).interval(Duration::from_secs(every))
            });
            let v = full_value(
                stamps, &url, &name, lease.as_deref(), &health, check.as_ref(), &info_json,
            );
            let raw = RawRecord::parse(&v).map_err(proptest::test_runner::TestCaseError::fail)?;
            proptest::prop_assert_eq!(
                [raw.registered_at, raw.last_updated, raw.last_ping_at, raw.expires_at],
                stamps
            );
            proptest::prop_assert_eq!(
                (raw.url, raw.name, raw.lease, raw.info_json),
                (url.as_str(), name.as_str(), lease.as_deref(), info_json.as_str())
            );
            proptest::prop_assert_eq!(raw.health.is_none(), health.is_unreported());
            proptest::prop_assert_eq!(
                raw.health.as_ref().map_or_else(Health::default, RawHealth::to_health),
                health.clone()
            );
            let check_json = check.as_ref().map(|c| serde_json::to_string(c).expect("encodes"));
            proptest::prop_assert_eq!(raw.check_json, check_json.as_deref());
            // The health field alone decodes to the same health (what register answers).
            proptest::prop_assert_eq!(
                health_from_field(health_field(&health).as_bytes()),
                Ok(health)
            );
        }

        /// Any bytes at all: an error or a record, never a panic.
        #[test]
        fn any_bytes_parse_or_fail_without_panicking(v in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = RawRecord::parse(&v);
        }
    }

    #[test]
    fn a_leased_record_keeps_its_lease_between_the_name_and_the_info() {
        let hash = "ab".repeat(32);
        let v = leased_value([1, 2, 3, 4], "http://h:1", "7:x", Some(&hash), r#"{"a":1}"#);
        let raw = RawRecord::parse(&v).expect("parses");
        assert_eq!(raw.lease, Some(hash.as_str()));
        assert_eq!(
            (raw.url, raw.name, raw.info_json),
            ("http://h:1", "7:x", r#"{"a":1}"#)
        );
        let unleased = value([1, 2, 3, 4], "http://h:1", "7:x", r#"{"a":1}"#);
        assert_eq!(RawRecord::parse(&unleased).expect("parses").lease, None);
        // A lease field whose length runs past the end is malformed.
        let mut cut = leased_value([1, 2, 3, 4], "http://h:1", "n", Some(&hash), "");
        cut.truncate(cut.len() - 1);
        assert!(RawRecord::parse(&cut).is_err());
    }

    #[test]
    fn record_values_round_trip_whatever_the_url_and_name_hold() {
        let info_json = r#"{"display_name":"x","team":"a:b|c"}"#;
        let stamps = [1, 1_761_566_430_000, 1_761_566_430_001, 9_999_999_999_999];
        for (url, name) in [
            ("http://10.0.0.7:8000", "service-042"),
            ("http://h:1/p?q=12:34|\"x\"", "7:é|☃\"{"),
            ("http://h:1", ""),
            ("http://ü.example/ß", "0:"),
        ] {
            let v = value(stamps, url, name, info_json);
            assert_eq!(&v[..13], b"0000000000001");
            assert_eq!(
                v[HEADER_LEN..].first(),
                Some(&url.len().to_string().as_bytes()[0])
            );
            let raw = RawRecord::parse(&v).expect("parses");
            assert_eq!(
                raw,
                RawRecord {
                    registered_at: stamps[0],
                    last_updated: stamps[1],
                    last_ping_at: stamps[2],
                    expires_at: stamps[3],
                    url,
                    name,
                    lease: None,
                    health: None,
                    check_json: None,
                    info_json,
                }
            );
            let bytes = Value::Bytes(v.into());
            let record = record_from_value(Ulid(7), &bytes)
                .expect("ok")
                .expect("some");
            assert_eq!(record.url, url);
            assert_eq!(record.info.extra["team"], "a:b|c");
            assert_eq!(record.expires_at.as_millis(), stamps[3]);
            assert_eq!(expiry_and_name(&bytes), (Some(stamps[3]), Some(name)));
        }
        assert_eq!(record_from_value(Ulid(7), &Value::Null).expect("ok"), None);
        assert_eq!(expiry_and_name(&Value::Null), (None, None));
    }

    /// Every truncation of `good` is `Corrupt`; replacing any byte by one of `troublemakers`
    /// never panics.
    fn damaged_copies_are_corrupt_never_a_panic(good: &[u8], troublemakers: &[u8]) {
        for end in 0..good.len() {
            let v = Value::Bytes(good[..end].to_vec().into());
            assert!(
                matches!(record_from_value(Ulid(1), &v), Err(StoreError::Corrupt(_))),
                "truncated at {end}"
            );
        }
        for i in 0..good.len() {
            for &b in troublemakers {
                let mut v = good.to_vec();
                v[i] = b;
                let _ = record_from_value(Ulid(1), &Value::Bytes(v.into()));
            }
        }
    }

    #[test]
    fn malformed_record_values_are_corrupt_never_a_panic() {
        let good = value([1, 2, 3, 4], "http://h:1", "né", r#"{"display_name":"né"}"#);
        damaged_copies_are_corrupt_never_a_panic(&good, &[b':', b'9', b'x', 0xff]);
        for bad in [
            &b""[..],
            b"garbage",
            &[b'1'; 60][..],
            b"0000000000001000000000000200000000000030000000000004x:http",
            b"000000000000100000000000020000000000003000000000000499999999999:x",
        ] {
            let v = Value::Bytes(bad.to_vec().into());
            assert!(
                matches!(record_from_value(Ulid(1), &v), Err(StoreError::Corrupt(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
            assert_eq!(expiry_and_name(&v), (None, None));
        }
        // The layout holds but the info is not a ServiceInfo: only decoding the record fails.
        let v = Value::Bytes(
            b"00000000000010000000000002000000000000300000000000042:ab2:cd{}"[..].into(),
        );
        assert!(matches!(
            record_from_value(Ulid(1), &v),
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(expiry_and_name(&v), (Some(4), Some("cd")));
        let not_a_string = Value::Array(vec![]);
        assert!(matches!(
            record_from_value(Ulid(1), &not_a_string),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn health_and_check_round_trip_each_with_and_without_the_other() {
        let info_json = r#"{"display_name":"x"}"#;
        let hash = "cd".repeat(32);
        let reported = Health {
            status: HealthStatus::Critical,
            output: "db: 12:34 {down}".into(),
            checked_at: Some(Timestamp::from_millis(1_761_566_430_123)),
        };
        let unstamped = Health {
            status: HealthStatus::Warning,
            output: String::new(),
            checked_at: None,
        };
        let check = CheckSpec::http("/health").deregister_critical_after(Duration::from_secs(30));
        for lease in [None, Some(hash.as_str())] {
            for health in [Health::default(), reported.clone(), unstamped.clone()] {
                for check in [None, Some(&check)] {
                    let v = full_value(
                        [1, 2, 3, 4],
                        "http://h:1",
                        "n",
                        lease,
                        &health,
                        check,
                        info_json,
                    );
                    let record = record_from_value(Ulid(9), &Value::Bytes(v.clone().into()))
                        .expect("decodes")
                        .expect("some");
                    assert_eq!(record.health, health);
                    assert_eq!(record.check.as_ref(), check);
                    assert_eq!(record.info.display_name, "x");
                    let raw = RawRecord::parse(&v).expect("parses");
                    assert_eq!(raw.lease, lease);
                    assert_eq!(raw.info_json, info_json);
                }
            }
        }
        // Records nothing reported on and without a check cost no byte more than before.
        let plain = value([1, 2, 3, 4], "http://h:1", "n", info_json);
        let with_defaults = full_value(
            [1, 2, 3, 4],
            "http://h:1",
            "n",
            None,
            &Health::default(),
            None,
            info_json,
        );
        assert_eq!(plain, with_defaults);
        assert_eq!(health_field(&Health::default()), "");
        assert_eq!(health_from_field(b""), Ok(Health::default()));
        assert_eq!(
            health_field(&reported),
            "h31:c1761566430123:db: 12:34 {down}"
        );
        assert_eq!(check_field(None).expect("encodes"), "");
    }

    #[test]
    fn malformed_health_and_check_fields_are_corrupt_never_a_panic() {
        let head = format!(
            "{}{}",
            "0".repeat(HEADER_LEN),
            record_head("http://h:1", "n")
        );
        let info = r#"{"display_name":"n"}"#;
        for extras in [
            "h",                           // no length
            "hx:p:",                       // bad length
            "h9:p:",                       // longer than the rest
            "h2:x:",                       // unknown status letter
            "h1:p",                        // no ':' after checked_at
            "h4:p1x:",                     // checked_at not digits
            "h23:p123456789012345678901:", // checked_at beyond u64
            "c",                           // check without a length
            "c99:{}",                      // check longer than the rest
            "c2:{}c2:{}",                  // two checks: the second is not info JSON
            "c10:{\"tcp\":3}",             // a check that is not a CheckSpec
            "c3:[1]",                      // nor JSON of one
            "h2:p:h2:p:",                  // two healths
        ] {
            let v = Value::Bytes(format!("{head}{extras}{info}").into_bytes().into());
            assert!(
                matches!(record_from_value(Ulid(1), &v), Err(StoreError::Corrupt(_))),
                "{extras:?}"
            );
        }
        // Every truncation of a record with both fields, and troublemakers in every byte.
        let reported = Health {
            status: HealthStatus::Critical,
            output: "é:1".into(),
            checked_at: Some(Timestamp::from_millis(5)),
        };
        let good = full_value(
            [1, 2, 3, 4],
            "http://h:1",
            "n",
            Some(&"ab".repeat(32)),
            &reported,
            Some(&CheckSpec::tcp()),
            info,
        );
        assert!(record_from_value(Ulid(1), &Value::Bytes(good.clone().into())).is_ok());
        damaged_copies_are_corrupt_never_a_panic(&good, &[b':', b'9', b'h', b'c', b'{', 0xff]);
        for bad in [&b"h"[..], b"h1:", b"h2:p:x", b"x", b"h3:p:"] {
            assert!(
                health_from_field(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn expiries_fit_the_header_for_the_longest_ttl() {
        // Expiry must fit 13 digits for a long time with the longest TTL accepted.
        let latest = 9_999_999_999_999u64 - MAX_TTL.as_millis() as u64;
        assert!(latest > 4_000_000_000_000, "year 2096 at least");
    }
}
