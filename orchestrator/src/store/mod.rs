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
//! (ping, get, delete) or only the URL (register).
//!
//! An id is minted for one URL and stays bound to it: no other URL can ever get it, whatever
//! it presents (the tag alone would not do: a URL with the same 15-bit tag takes about 30k
//! hash tries to find). A registration gets, in this order: the id of the URL's live entry;
//! the id the URL had while that *binding* is remembered; the id the client presents, when
//! its tombstone names this URL; else a fresh one. A binding is remembered for a *grace*
//! ([`binding_grace`]: one TTL, at least a minute) after the entry expired (Valkey: the URL
//! key lives `ttl + grace`, refreshed with the record), and a tombstone for the grace after a
//! deregistration. So a service that lost its entry (a network partition or an orchestrator
//! outage longer than the TTL, a deregistration it did not mean) and comes back within the
//! grace keeps its id; later, or after the store lost its data, it gets a new one (nothing
//! proves the old one was its own any more). Remembering longer would cost memory for every
//! URL that ever registered; a new id every time is what the reference did. Both stores apply
//! this rule; `docs/valkey-store.md` has the keys.
//!
//! # Leases
//!
//! A registration may take a lease: the store keeps the SHA-256 of a token ([`LeaseHash`])
//! with the entry, and from then on a ping, deregistration or re-registration of that entry
//! must present the same hash or the admin key ([`Access`]); otherwise it fails with
//! [`StoreError::Forbidden`] and changes nothing. Check and write are one atomic step (the
//! lock of the memory store, one script in Valkey). A lease ends with its entry: once the
//! entry expired or was deregistered, its URL is free for anyone.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use servicekit::protocol::{
    CheckSpec, Health, HealthStatus, ServiceInfo, ServiceRecord, Timestamp,
};
use ulid::Ulid;

pub use crate::lease::LeaseHash;

pub mod changes;
pub mod memory;
pub mod valkey;

pub use changes::{Change, ChangeKind, Changes, Cursor, Subject, CHANGE_LOG_LEN};
pub use memory::{MemoryListing, MemoryStore};
pub use valkey::{ValkeyListing, ValkeyStore};

/// Number of low id bits that carry the URL's slot tag.
const TAG_BITS: u32 = 15;
const TAG_MASK: u128 = (1 << TAG_BITS) - 1;

/// The shortest grace during which a URL stays bound to its id after its entry expired or was
/// deregistered (see the module docs).
pub const MIN_BINDING_GRACE: Duration = Duration::from_secs(60);

/// The default grace for a TTL: one TTL, at least [`MIN_BINDING_GRACE`].
pub fn binding_grace(ttl: Duration) -> Duration {
    ttl.max(MIN_BINDING_GRACE)
}

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
    /// The check the orchestrator runs on the instance (validated); replaces the entry's
    /// check on a re-registration. The entry's health survives a re-registration with the
    /// same check (or none before and after); a changed check starts from the default.
    pub check: Option<CheckSpec>,
}

/// The result of a registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    pub record: ServiceRecord,
    /// `true` for a new entry, `false` when the URL was already registered.
    pub created: bool,
    /// What became of the entry's lease.
    pub lease: LeaseOutcome,
}

/// What a write presents for an entry that may be leased. The default presents nothing,
/// which is enough for every entry without a lease.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    /// The hash of the `X-Lease-Token` the request carried.
    pub token: Option<LeaseHash>,
    /// Whether the request carried the admin key: every lease check passes.
    pub admin: bool,
}

/// What became of the lease in a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// The entry has no lease.
    None,
    /// The lease asked for (its hash was given) now guards the entry.
    New,
    /// The entry's lease is unchanged; the caller presented its token.
    Kept,
    /// The entry's lease is unchanged; the caller (with the admin key) does not know it.
    Held,
}

impl LeaseOutcome {
    /// The outcome of a write on an entry leased with `held` (if any) by a caller presenting
    /// `access` and asking for `new`; `Err(())` when the caller may not write. The one
    /// statement of the rule; `lua/register.lua` mirrors it.
    pub fn decide(
        held: Option<&LeaseHash>,
        access: Access,
        new: Option<&LeaseHash>,
    ) -> Result<LeaseOutcome, StoreError> {
        let presented = |h: &LeaseHash| access.token.as_ref().is_some_and(|t| t.matches(h));
        Ok(match (held, new) {
            (Some(h), _) if presented(h) => LeaseOutcome::Kept,
            (Some(_), Some(_)) if access.admin => LeaseOutcome::New,
            (Some(_), None) if access.admin => LeaseOutcome::Held,
            (Some(_), _) => return Err(StoreError::Forbidden),
            (None, Some(_)) => LeaseOutcome::New,
            (None, None) => LeaseOutcome::None,
        })
    }
}

/// The result of a successful ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pinged {
    pub id: Ulid,
    pub last_ping_at: Timestamp,
    pub expires_at: Timestamp,
}

/// The longest health-checker replica id [`Store::checkers`] accepts, in bytes.
pub const MAX_CHECKER_ID_LEN: usize = 128;

/// The longest announcement [`Store::checkers`] accepts.
pub const MAX_CHECKER_TTL: Duration = Duration::from_secs(24 * 3600);

/// Whether [`Store::checkers`] may announce `replica` for `ttl`: an id of 1 to
/// [`MAX_CHECKER_ID_LEN`] bytes without control characters (it is ours, but no text reaches
/// a store unbounded), a ttl from 1 ms to [`MAX_CHECKER_TTL`]. [`StoreError::Config`]
/// otherwise.
pub fn checker_replica_ok(replica: &str, ttl: Duration) -> Result<(), StoreError> {
    if ttl.as_millis() == 0 || ttl > MAX_CHECKER_TTL {
        return Err(StoreError::Config(format!(
            "a checker's announcement lasts 1 ms to {} s, not {ttl:?}",
            MAX_CHECKER_TTL.as_secs()
        )));
    }
    if replica.is_empty()
        || replica.len() > MAX_CHECKER_ID_LEN
        || replica.chars().any(char::is_control)
    {
        return Err(StoreError::Config(format!(
            "a checker replica id is 1 to {MAX_CHECKER_ID_LEN} printable bytes, not {:?}",
            replica.chars().take(32).collect::<String>()
        )));
    }
    Ok(())
}

/// The result of [`Store::set_health`].
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSet {
    /// The record with its new health.
    pub record: ServiceRecord,
    /// Whether the status changed (then the change log has an `Updated` for it).
    pub changed: bool,
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
    /// `?health=passing,warning`: the record's health status is one of these; empty: any.
    pub health: Vec<HealthStatus>,
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
        if !self.health.is_empty() && !self.health.contains(&record.health.status) {
            return false;
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
    /// Why the store refused the health check's test write although it answers (Valkey out
    /// of memory with `noeviction`, a read-only replica): `GET /health` is then `degraded`.
    pub write_refused: Option<String>,
    /// For a Valkey Cluster, what the cluster says about itself and which masters this
    /// orchestrator reaches; `None` for a standalone Valkey and the memory store.
    pub cluster: Option<ClusterHealth>,
}

/// A Valkey Cluster's state as `GET /health` reports it (docs/valkey-store.md, "Connection
/// behaviour").
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterHealth {
    /// `cluster_state` of `CLUSTER INFO` on the node the client asked (`ok`, `fail`), or
    /// `unknown` when that command failed.
    pub state: String,
    /// `cluster_slots_assigned`, `_ok`, `_pfail` and `_fail` of `CLUSTER INFO`.
    pub slots_assigned: u32,
    pub slots_ok: u32,
    pub slots_pfail: u32,
    pub slots_fail: u32,
    /// `cluster_known_nodes` and `cluster_size` (masters serving slots) of `CLUSTER INFO`.
    pub known_nodes: u32,
    pub size: u32,
    /// The masters this client routes to (`host:port`), from its cached slot map.
    pub masters: Vec<String>,
    /// Those of [`Self::masters`] that did not answer a `PING` in time.
    pub unreachable: Vec<String>,
    /// Why `CLUSTER INFO` could not be read, if it could not.
    pub error: Option<String>,
}

impl ClusterHealth {
    /// Hash slots in a Valkey Cluster.
    pub const SLOTS: u32 = 16_384;

    /// Why the cluster does not serve every slot through this client, if it does not: the
    /// cluster says it is failing, a slot is unassigned or on a failed master, or a master the
    /// client routes to does not answer. Slots on a master only suspected (`pfail`) still work.
    pub fn problem(&self) -> Option<String> {
        if let Some(error) = &self.error {
            return Some(format!("CLUSTER INFO failed: {error}"));
        }
        if self.state != "ok" {
            return Some(format!("cluster_state is {}", self.state));
        }
        if self.slots_assigned < Self::SLOTS || self.slots_fail > 0 {
            return Some(format!(
                "{} of {} slots are served ({} on failed masters)",
                self.slots_assigned.saturating_sub(self.slots_fail),
                Self::SLOTS,
                self.slots_fail
            ));
        }
        if self.masters.is_empty() {
            return Some("the client knows no master".to_owned());
        }
        if !self.unreachable.is_empty() {
            return Some(format!(
                "master(s) not answering: {}",
                self.unreachable.join(", ")
            ));
        }
        None
    }
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
    /// The entry is leased and the write presented neither its token nor the admin key. The
    /// one client-caused variant: only the store can tell, atomically with the write.
    #[error("the entry is leased: present its lease token or the admin key")]
    Forbidden,
}

/// How often the orchestrator calls [`Store::reap`].
pub const REAP_INTERVAL: Duration = Duration::from_millis(500);

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
/// - a leased entry is written only by a caller presenting its lease or the admin key, and
///   the check is atomic with the write (see the module docs);
/// - an id is never handed to another URL than the one it was minted for;
/// - indexes shrink as entries go, at the latest on the next [`Store::sweep`];
/// - every registration appends `Registered` (the log had not announced the entry) or
///   `Updated` to the change log after its write, and an announced entry gets at most one
///   removal (`Deregistered` from its deregistration, else `Expired` from the first
///   [`Store::reap`], read or sweep that sees it gone); per entry, changes are logged in the
///   order they happened.
pub trait Store: Send + Sync + 'static {
    /// A listing in progress; see [`Store::listing`].
    type Listing: Listing;

    /// `"memory"` or `"valkey"`, for logs and health.
    fn kind(&self) -> &'static str;

    /// The time-to-live of entries.
    fn ttl(&self) -> Duration;

    /// Creates or refreshes the registration of `reg.url`, presenting nothing and asking for
    /// no lease ([`Store::register_as`]).
    fn register(
        &self,
        reg: Registration,
    ) -> impl Future<Output = Result<Registered, StoreError>> + Send {
        self.register_as(reg, Access::default(), None)
    }

    /// Creates or refreshes the registration of `reg.url` as a caller presenting `access`;
    /// `new_lease` asks for a lease with that hash (see [`LeaseOutcome::decide`]). A live
    /// leased entry the caller may not write is [`StoreError::Forbidden`].
    fn register_as(
        &self,
        reg: Registration,
        access: Access,
        new_lease: Option<LeaseHash>,
    ) -> impl Future<Output = Result<Registered, StoreError>> + Send;

    /// Extends a live entry's TTL; `None` when it is unknown or expired. Presents nothing.
    fn ping(&self, id: Ulid) -> impl Future<Output = Result<Option<Pinged>, StoreError>> + Send {
        self.ping_as(id, Access::default())
    }

    /// [`Store::ping`] as a caller presenting `access`; [`StoreError::Forbidden`] for a live
    /// leased entry it may not write.
    fn ping_as(
        &self,
        id: Ulid,
        access: Access,
    ) -> impl Future<Output = Result<Option<Pinged>, StoreError>> + Send;

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

    /// Removes an entry and returns what it was; `None` when unknown or expired. Presents
    /// nothing.
    fn deregister(
        &self,
        id: Ulid,
    ) -> impl Future<Output = Result<Option<ServiceRecord>, StoreError>> + Send {
        self.deregister_as(id, Access::default())
    }

    /// [`Store::deregister`] as a caller presenting `access`; [`StoreError::Forbidden`] for a
    /// live leased entry it may not write.
    fn deregister_as(
        &self,
        id: Ulid,
        access: Access,
    ) -> impl Future<Output = Result<Option<ServiceRecord>, StoreError>> + Send;

    /// Sets a live entry's health as a caller presenting `access` (the orchestrator's own
    /// checks present the admin key); [`StoreError::Forbidden`] for a live leased entry it
    /// may not write. Logs `Updated` when the status changed, nothing when only the output or
    /// time did. `None` when the entry is unknown or expired.
    fn set_health(
        &self,
        id: Ulid,
        health: Health,
        access: Access,
    ) -> impl Future<Output = Result<Option<HealthSet>, StoreError>> + Send;

    /// Says that the health checker `replica` is alive for `ttl` from now, and returns every
    /// checker alive now (itself included), sorted: the replicas that share the checks.
    fn checkers(
        &self,
        replica: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Drops index entries of expired registrations; returns how many were dropped.
    fn sweep(&self) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Checks that the store answers and accepts a write.
    fn health(&self) -> impl Future<Output = Result<StoreHealth, StoreError>> + Send;

    /// About how many registrations the store holds, for `/metrics` and
    /// `--max-registrations`: cheap (one read), and counting expired entries until the next
    /// [`Store::sweep`] drops them.
    fn count(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The cursor of the newest change in the log ([`Cursor::ZERO`] when it is empty). A
    /// listing started after this call reflects every change up to it.
    fn change_head(&self) -> impl Future<Output = Result<Cursor, StoreError>> + Send;

    /// At most `limit` (≥ 1) changes after `after`, oldest first. When there is none yet,
    /// waits up to `wait` for one and answers an empty batch if none came (a non-zero `wait`
    /// is for one reader per process, the watch hub: Valkey serves it on a connection of its
    /// own). [`Changes::Gap`] when the log no longer holds every change after `after`.
    fn changes(
        &self,
        after: Cursor,
        limit: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Changes, StoreError>> + Send;

    /// Logs `Expired` for announced entries whose TTL has passed and whose removal is not
    /// logged yet; returns how many. The orchestrator calls it every [`REAP_INTERVAL`], so an
    /// expiry reaches watchers within about that (plus the time to notice it among many).
    fn reap(&self) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// The store's count of connections to its backend that came back after being lost, for
    /// `/metrics`; `None` for a store without a connection.
    fn reconnects(&self) -> Option<prometheus_client::metrics::counter::Counter> {
        None
    }
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
