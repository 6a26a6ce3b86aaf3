//! Where registrations live, behind one trait with two implementations.
//!
//! [`MemoryStore`] is the zero-setup default for one orchestrator process; [`ValkeyStore`] keeps
//! registrations in Valkey with real TTL expiry so several stateless orchestrators can share
//! them. Both pass the same contract suite (`tests/store_contract.rs`), so the HTTP layer never
//! needs to know which one it talks to.
//!
//! # Identity and placement
//!
//! Ids are ULIDs. The orchestrator mints them so that the lowest 15 bits (the last three
//! characters of the text form) are a hash of the service URL: the *slot tag*. Valkey keys of
//! one registration carry that tag in braces, so in Valkey Cluster every key of a registration
//! lands in one hash slot and every script touches one slot, whether the caller knows the id
//! (ping, get, delete) or only the URL (register). A client may present a previous id when it
//! registers again; it is kept when it is a ULID whose tag matches the URL and no other URL
//! holds it. Every other id is ignored and a fresh one minted. Both stores apply this rule.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use servicekit::protocol::{ServiceInfo, ServiceRecord, Timestamp};
use ulid::Ulid;

pub mod memory;
pub mod valkey;

pub use memory::{MemoryListing, MemoryStore};
pub use valkey::{ValkeyListing, ValkeyStore};

/// Number of low id bits that carry the URL's slot tag.
const TAG_BITS: u32 = 15;
const TAG_MASK: u128 = (1 << TAG_BITS) - 1;

/// The slot tag of a service URL: 15 bits of a stable (FNV-1a) hash of its canonical form.
pub fn url_tag(url: &str) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in url.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h as u128 & TAG_MASK) as u16
}

/// The slot tag an id carries.
pub fn id_tag(id: Ulid) -> u16 {
    (id.0 & TAG_MASK) as u16
}

/// A fresh id for `url`, carrying its slot tag.
pub fn mint_id(url: &str) -> Ulid {
    let id = Ulid::new();
    Ulid((id.0 & !TAG_MASK) | u128::from(url_tag(url)))
}

/// Whether a presented id may be kept for `url` (see the module docs).
pub fn id_fits_url(id: Ulid, url: &str) -> bool {
    id_tag(id) == url_tag(url)
}

/// A registration as the store receives it: already validated and canonical.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// Canonical absolute http(s) URL; the identity of the registration.
    pub url: String,
    pub info: ServiceInfo,
    /// An id the client had before; kept only under the rule in the module docs.
    pub requested_id: Option<Ulid>,
}

/// The result of a registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    pub record: ServiceRecord,
    /// `true` for a new entry, `false` when the URL was already registered.
    pub created: bool,
}

/// The result of a successful ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pinged {
    pub id: Ulid,
    pub last_ping_at: Timestamp,
    pub expires_at: Timestamp,
}

/// Which registrations `GET /services` returns. All given conditions must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListFilter {
    /// `?display_name=X`: served from the by-name index.
    pub display_name: Option<String>,
    /// `?url=U`: served from the URL index. Canonical form.
    pub url: Option<String>,
    /// `?info.FIELD=VALUE`: equality for strings, numbers and booleans; membership for arrays.
    pub info: Vec<(String, String)>,
}

impl ListFilter {
    /// Whether `record` satisfies every condition of the filter.
    pub fn matches(&self, record: &ServiceRecord) -> bool {
        if let Some(name) = &self.display_name {
            if record.info.display_name != *name {
                return false;
            }
        }
        if let Some(url) = &self.url {
            if record.url != *url {
                return false;
            }
        }
        self.info
            .iter()
            .all(|(field, wanted)| info_field_matches(&record.info, field, wanted))
    }
}

fn info_field_matches(info: &ServiceInfo, field: &str, wanted: &str) -> bool {
    use serde_json::Value;
    let value = match field {
        "display_name" => return info.display_name == wanted,
        "version" => return info.version.as_deref() == Some(wanted),
        "description" => return info.description.as_deref() == Some(wanted),
        other => match info.extra.get(other) {
            Some(v) => v,
            None => return false,
        },
    };
    fn scalar_eq(v: &Value, wanted: &str) -> bool {
        match v {
            Value::String(s) => s == wanted,
            Value::Bool(b) => wanted.parse::<bool>().is_ok_and(|w| w == *b),
            Value::Number(n) => {
                n.to_string() == wanted
                    || matches!((n.as_f64(), wanted.parse::<f64>()), (Some(a), Ok(b)) if a == b)
            }
            _ => false,
        }
    }
    match value {
        Value::Array(items) => items.iter().any(|v| scalar_eq(v, wanted)),
        v => scalar_eq(v, wanted),
    }
}

/// What a store reports to `GET /health`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreHealth {
    /// `"memory"` or `"valkey"`.
    pub kind: &'static str,
    /// How long the check took.
    pub latency: Duration,
}

/// Why a store operation failed. Client mistakes never reach the store, so every variant
/// here is the store's own trouble.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backing service did not answer in time or refused the connection. Retryable.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store cannot be used as configured (bad URL, bad prefix). Not retryable.
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// The store answered with something this code does not understand.
    #[error("store returned unexpected data: {0}")]
    Corrupt(String),
}

/// Records a listing reads per step when the caller has no page size of its own.
pub const LIST_BATCH: usize = 500;

/// A listing in progress: the pages of [`Store::listing`], in id order.
pub trait Listing: Send + 'static {
    /// The next at most `limit` (≥ 1) records; empty once the listing is done. Records are
    /// shared (`Arc`), so a store hands them out without copying them.
    fn next_page(
        &mut self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Arc<ServiceRecord>>, StoreError>> + Send;
}

/// The registry's storage contract.
///
/// Every implementation guarantees:
/// - an entry exists from its registration until `ttl` after its last registration or ping,
///   or until it is deregistered; expired entries are never returned by any method;
/// - `register` is idempotent per URL (same id, `registered_at` kept, info replaced);
/// - `ping` is atomic: it extends a live entry and never brings back a deleted or expired one;
/// - indexes shrink as entries go, at the latest on the next [`Store::sweep`].
pub trait Store: Send + Sync + 'static {
    /// A listing in progress; see [`Store::listing`].
    type Listing: Listing;

    /// `"memory"` or `"valkey"`, for logs and health.
    fn kind(&self) -> &'static str;

    /// The time-to-live of entries.
    fn ttl(&self) -> Duration;

    /// Creates or refreshes the registration of `reg.url`.
    fn register(
        &self,
        reg: Registration,
    ) -> impl Future<Output = Result<Registered, StoreError>> + Send;

    /// Extends a live entry's TTL; `None` when it is unknown or expired.
    fn ping(&self, id: Ulid) -> impl Future<Output = Result<Option<Pinged>, StoreError>> + Send;

    /// One entry, `None` when unknown or expired.
    fn get(
        &self,
        id: Ulid,
    ) -> impl Future<Output = Result<Option<ServiceRecord>, StoreError>> + Send;

    /// Starts a listing of the live entries matching `filter` with an id greater than `after`,
    /// read page by page in id order (registration order), so no caller ever holds all of
    /// them. An entry live from the start of the listing to its end is returned exactly once;
    /// one registered or removed meanwhile may or may not be.
    fn listing(
        &self,
        filter: ListFilter,
        after: Option<Ulid>,
    ) -> impl Future<Output = Result<Self::Listing, StoreError>> + Send;

    /// Every live entry matching `filter`, in id order: a whole listing in one `Vec`, for
    /// tests and tools. The API never calls it.
    fn list(
        &self,
        filter: &ListFilter,
    ) -> impl Future<Output = Result<Vec<ServiceRecord>, StoreError>> + Send {
        let filter = filter.clone();
        async move {
            let mut listing = self.listing(filter, None).await?;
            let mut out = Vec::new();
            loop {
                let page = listing.next_page(LIST_BATCH).await?;
                if page.is_empty() {
                    return Ok(out);
                }
                out.extend(page.into_iter().map(Arc::unwrap_or_clone));
            }
        }
    }

    /// How many entries count against `--max-registrations`: every live one, plus expired
    /// ones the store has not dropped yet (at most until the next [`Store::sweep`]).
    fn count(&self) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Removes an entry and returns what it was; `None` when unknown or expired.
    fn deregister(
        &self,
        id: Ulid,
    ) -> impl Future<Output = Result<Option<ServiceRecord>, StoreError>> + Send;

    /// Drops index entries of expired registrations; returns how many were dropped.
    fn sweep(&self) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Checks that the store answers.
    fn health(&self) -> impl Future<Output = Result<StoreHealth, StoreError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_ids_carry_the_url_tag() {
        for url in [
            "http://svca:8000",
            "http://svcb:8000",
            "https://x.example/a",
        ] {
            let id = mint_id(url);
            assert!(id_fits_url(id, url));
            assert_eq!(id_tag(id), url_tag(url));
        }
        assert_ne!(url_tag("http://svca:8000"), url_tag("http://svcb:8000"));
    }

    #[test]
    fn info_filters_compare_scalars_and_arrays() {
        let info: ServiceInfo = serde_json::from_value(serde_json::json!({
            "display_name": "A", "version": "1.0", "priority": 5, "gpu": true,
            "capabilities": ["ml", "etl"], "ratio": 0.5
        }))
        .unwrap();
        let yes = |f: &str, v: &str| info_field_matches(&info, f, v);
        assert!(yes("priority", "5"));
        assert!(yes("ratio", "0.50"));
        assert!(yes("gpu", "true"));
        assert!(yes("capabilities", "etl"));
        assert!(yes("version", "1.0"));
        assert!(!yes("priority", "6"));
        assert!(!yes("capabilities", "web"));
        assert!(!yes("missing", "x"));
        assert!(!yes("gpu", "yes"));
    }
}
