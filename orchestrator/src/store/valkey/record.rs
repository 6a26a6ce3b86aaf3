//! The record codec: one string per registration, a fixed-width header of four timestamps,
//! then the length-prefixed URL and display name, the length-prefixed lease hash of a leased
//! record, and the info JSON (see `docs/valkey-store.md`). Never panics on a malformed value. The constants here are the one
//! statement of the layout: the Lua scripts get them from a prelude rendered from them.

use std::time::Duration;

use fred::types::Value;
use servicekit::protocol::{Health, ServiceInfo, ServiceRecord, Timestamp};
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
        let (lease, info) = match rest.first() {
            Some(b) if b.is_ascii_digit() => {
                let (lease, info) = length_prefixed(rest, "lease")?;
                (Some(lease), info)
            }
            _ => (None, rest),
        };
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
            info_json,
        })
    }

    pub(super) fn into_record(self, id: Ulid) -> Result<ServiceRecord, StoreError> {
        let info: ServiceInfo = serde_json::from_str(self.info_json)
            .map_err(|e| StoreError::Corrupt(format!("record {id}: bad info JSON: {e}")))?;
        Ok(ServiceRecord {
            id,
            url: self.url.to_owned(),
            info,
            registered_at: Timestamp::from_millis(self.registered_at),
            last_updated: Timestamp::from_millis(self.last_updated),
            last_ping_at: Timestamp::from_millis(self.last_ping_at),
            expires_at: Timestamp::from_millis(self.expires_at),
            health: Health::default(),
            check: None,
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
        let header: String = stamps.iter().map(|ms| format!("{ms:013}")).collect();
        let lease = lease.map_or(String::new(), |h| format!("{}:{h}", h.len()));
        format!("{header}{}{lease}{info_json}", record_head(url, name)).into_bytes()
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
            info in proptest::collection::btree_map(".*", ".*", 0..4),
        ) {
            let info_json = serde_json::to_string(&info).expect("a map of strings encodes");
            let v = leased_value(stamps, &url, &name, lease.as_deref(), &info_json);
            let raw = RawRecord::parse(&v).map_err(proptest::test_runner::TestCaseError::fail)?;
            proptest::prop_assert_eq!(
                [raw.registered_at, raw.last_updated, raw.last_ping_at, raw.expires_at],
                stamps
            );
            proptest::prop_assert_eq!(
                (raw.url, raw.name, raw.lease, raw.info_json),
                (url.as_str(), name.as_str(), lease.as_deref(), info_json.as_str())
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

    #[test]
    fn malformed_record_values_are_corrupt_never_a_panic() {
        let good = value([1, 2, 3, 4], "http://h:1", "né", r#"{"display_name":"né"}"#);
        // Every truncation, and every byte replaced by a few troublemakers.
        for end in 0..good.len() {
            let v = Value::Bytes(good[..end].to_vec().into());
            assert!(
                matches!(record_from_value(Ulid(1), &v), Err(StoreError::Corrupt(_))),
                "truncated at {end}"
            );
        }
        for i in 0..good.len() {
            for b in [b':', b'9', b'x', 0xff] {
                let mut v = good.clone();
                v[i] = b;
                let _ = record_from_value(Ulid(1), &Value::Bytes(v.into()));
            }
        }
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
    fn expiries_fit_the_header_for_the_longest_ttl() {
        // Expiry must fit 13 digits for a long time with the longest TTL accepted.
        let latest = 9_999_999_999_999u64 - MAX_TTL.as_millis() as u64;
        assert!(latest > 4_000_000_000_000, "year 2096 at least");
    }
}
