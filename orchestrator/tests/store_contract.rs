//! The storage contract, run against every `Store` implementation.
//!
//! Each test body is written once, generic over a [`Harness`], and instantiated by
//! `contract_tests!` as `memory::<name>` (on `MemoryStore`), `valkey::<name>` (on
//! `ValkeyStore` against a real `valkey-server` child process; see `support/valkey.rs`) and
//! `cluster::<name>` (on the test binary's shared six-node Valkey Cluster, each test on a key
//! prefix of its own; see `support/cluster.rs`). A few
//! Valkey-only tests at the end check the documented key layout and connection behaviour.
//!
//! Expiry tests run on tokio's paused clock for the memory store (exact instants, no real
//! sleeps) and in real time for Valkey. There they time every store call and assert only what
//! the measured times guarantee: when the test itself was descheduled past a deadline, the
//! round is retried instead of failing (see [`in_time`]).

mod support;

use std::future::Future;
use std::time::Duration;

use fred::interfaces::{ClientLike, KeysInterface, SetsInterface, SortedSetsInterface};
use fred::types::{ClusterHash, CustomCommand};
use serde_json::json;
use servicekit::protocol::{
    CheckSpec, Health, HealthStatus, ServiceInfo, ServiceRecord, Timestamp,
};
use servicekit_orchestrator::store::{
    binding_grace, id_fits_url, mint_id, url_tag, Access, ChangeKind, Changes, Cursor, LeaseHash,
    LeaseOutcome, ListFilter, Listing, MemoryStore, Registration, Store, StoreError, Subject,
    ValkeyStore,
};
use support::valkey::ValkeyServer;
use tokio::time::Instant;
use ulid::Ulid;

/// TTL of tests that never wait for expiry.
const LONG_TTL: Duration = Duration::from_secs(60);
/// TTL of tests that wait for expiry: long enough that a loaded machine rarely misses a
/// timing window, short enough to wait out a few times.
const EXPIRY_TTL: Duration = Duration::from_secs(2);
/// How far the store's expiry clock (Valkey's, in whole milliseconds) may be off this
/// process's clock when judging whether a deadline had certainly passed or not.
const CLOCK_SLACK: Duration = Duration::from_millis(100);
/// Rounds an expiry test may retry because the machine descheduled it past a deadline.
const ROUNDS: usize = 5;
/// Slack for comparing store timestamps with this process's clock.
const CLOCK_SLACK_MS: u64 = 1_000;

// ---------------------------------------------------------------------------------------------
// Harnesses

/// One store under test plus whatever it needs to run.
trait Harness: Sized + Send + Sync + 'static {
    type S: Store + Clone;
    /// What `Store::kind` and `StoreHealth::kind` must say.
    const KIND: &'static str;
    /// Index entries that one live registration occupies (see `index_len`).
    const PER_ENTRY: usize;
    /// Whether expiry tests run on tokio's paused clock (then no timing window is ever missed).
    const PAUSED: bool;

    async fn open(ttl: Duration) -> Self;
    fn store(&self) -> &Self::S;
    /// The same harness with another binding grace (see `store::binding_grace`).
    fn with_grace(self, grace: Duration) -> Self;
    /// Entries held in the store's indexes, live or dead.
    async fn index_len(&self) -> usize;
}

struct Memory {
    store: MemoryStore,
}

impl Harness for Memory {
    type S = MemoryStore;
    const KIND: &'static str = "memory";
    /// The entry itself, its URL index entry and its name index entry.
    const PER_ENTRY: usize = 3;
    const PAUSED: bool = true;

    async fn open(ttl: Duration) -> Self {
        Memory {
            store: MemoryStore::new(ttl),
        }
    }

    fn store(&self) -> &MemoryStore {
        &self.store
    }

    fn with_grace(self, grace: Duration) -> Self {
        Memory {
            store: self.store.with_binding_grace(grace),
        }
    }

    async fn index_len(&self) -> usize {
        self.store.index_len()
    }
}

/// Where a Valkey harness's server comes from: its own `valkey-server`, or the test binary's
/// shared six-node cluster (each test on a key prefix of its own).
trait Backend: Send + Sync + 'static {
    /// Starts (or finds) the backend; it and its URL.
    async fn start() -> (Self, String)
    where
        Self: Sized;
}

impl Backend for ValkeyServer {
    async fn start() -> (Self, String) {
        let server = tokio::task::spawn_blocking(ValkeyServer::new)
            .await
            .expect("start valkey-server");
        let url = server.url();
        (server, url)
    }
}

/// The shared cluster of this test binary.
struct Shared;

impl Backend for Shared {
    async fn start() -> (Self, String) {
        (Shared, support::cluster::shared_async().await.url())
    }
}

struct ValkeyOn<B> {
    store: ValkeyStore,
    prefix: String,
    // Dropped last: kills a server of the test's own.
    _server: B,
}

/// On a `valkey-server` of the test's own.
type Valkey = ValkeyOn<ValkeyServer>;
/// On the shared Valkey Cluster, through all six nodes as seeds.
type Cluster = ValkeyOn<Shared>;

impl<B> ValkeyOn<B> {
    fn all_idx(&self) -> String {
        format!("{}{{all}}:idx", self.prefix)
    }
    fn names(&self) -> String {
        format!("{}{{all}}:names", self.prefix)
    }
    fn name_idx(&self, name: &str) -> String {
        format!("{}{{n:{name}}}:idx", self.prefix)
    }
    fn tag(id: Ulid) -> String {
        id.to_string()[23..].to_owned()
    }
    fn svc_key(&self, id: Ulid) -> String {
        format!("{}{{{}}}:svc:{id}", self.prefix, Self::tag(id))
    }
    fn url_key(&self, id: Ulid, url: &str) -> String {
        format!("{}{{{}}}:url:{url}", self.prefix, Self::tag(id))
    }
    async fn zcard(&self, key: &str) -> usize {
        self.store.client().zcard(key).await.expect("ZCARD")
    }
}

impl<B: Backend> Harness for ValkeyOn<B> {
    type S = ValkeyStore;
    const KIND: &'static str = "valkey";
    /// Its member in `{all}:idx` and in its name index.
    const PER_ENTRY: usize = 2;
    const PAUSED: bool = false;

    async fn open(ttl: Duration) -> Self {
        let (server, url) = B::start().await;
        let prefix = format!("test:{}:", Ulid::new());
        let store = ValkeyStore::connect(&url, &prefix, ttl)
            .await
            .expect("connect to Valkey");
        ValkeyOn {
            store,
            prefix,
            _server: server,
        }
    }

    fn store(&self) -> &ValkeyStore {
        &self.store
    }

    fn with_grace(self, grace: Duration) -> Self {
        ValkeyOn {
            store: self.store.with_binding_grace(grace),
            ..self
        }
    }

    async fn index_len(&self) -> usize {
        let names: Vec<String> = self
            .store
            .client()
            .smembers(self.names())
            .await
            .expect("SMEMBERS");
        let mut n = self.zcard(&self.all_idx()).await;
        for name in names {
            n += self.zcard(&self.name_idx(&name)).await;
        }
        n
    }
}

/// `any_clock` tests run in real time on every store (two worker threads, so races are
/// real); `expiry` tests run on paused time for the memory store, in real time on Valkey and
/// on the cluster.
macro_rules! contract_tests {
    (any_clock: [$($name:ident),* $(,)?], expiry: [$($timed:ident),* $(,)?] $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name::<super::Memory>().await
                }
            )*
            $(
                #[tokio::test(start_paused = true)]
                async fn $timed() {
                    super::$timed::<super::Memory>().await
                }
            )*
        }
        contract_tests!(@real valkey, Valkey, [$($name,)* $($timed,)*]);
        contract_tests!(@real cluster, Cluster, [$($name,)* $($timed,)*]);
    };
    (@real $module:ident, $harness:ident, [$($name:ident,)*]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name::<super::$harness>().await
                }
            )*
        }
    };
}

contract_tests!(
    any_clock: [
        kind_ttl_and_health,
        register_creates,
        register_is_idempotent,
        concurrent_registers_of_one_url_make_one_entry,
        requested_id_of_another_url_gets_a_fresh_id,
        requested_id_not_fitting_the_url_gets_a_fresh_id,
        unknown_ids_are_none,
        deregister_returns_the_record_and_hides_it,
        ping_and_deregister_race_leaves_nothing,
        list_filters,
        display_name_change_moves_between_indexes,
        a_deregistered_id_is_never_handed_to_another_url,
        a_lease_guards_every_write_of_its_entry,
        an_unleased_entry_can_take_a_lease,
        pages_return_every_entry_once_in_id_order,
        pages_honour_every_filter,
        pages_across_registrations_and_removals,
        set_health_sets_and_persists,
        a_status_change_logs_one_updated,
        set_health_of_an_unknown_id_is_none,
        a_lease_guards_set_health,
        lists_filter_by_health,
        a_check_round_trips_and_is_replaced,
        checkers_lists_every_live_replica,
    ],
    expiry: [
        set_health_of_an_expired_id_is_none,
        a_silent_checker_is_gone_after_its_ttl,
        reregister_restarts_the_ttl,
        requested_id_is_kept_after_expiry,
        ping_extends_life,
        ping_of_expired_is_none_and_stays_gone,
        expired_entries_are_never_listed,
        sweep_drops_dead_index_entries,
        an_expired_id_is_never_handed_to_another_url,
        a_binding_ends_one_ttl_after_expiry,
        an_expired_lease_frees_the_url,
    ],
);

// ---------------------------------------------------------------------------------------------
// Helpers

fn info(value: serde_json::Value) -> ServiceInfo {
    serde_json::from_value(value).expect("valid ServiceInfo")
}

fn reg(url: &str, name: &str) -> Registration {
    Registration {
        url: url.to_owned(),
        info: ServiceInfo::new(name),
        requested_id: None,
        check: None,
    }
}

fn with_id(mut r: Registration, id: Ulid) -> Registration {
    r.requested_id = Some(id);
    r
}

fn all() -> ListFilter {
    ListFilter::default()
}

fn by_name(name: &str) -> ListFilter {
    ListFilter {
        display_name: Some(name.to_owned()),
        ..ListFilter::default()
    }
}

fn by_url(url: &str) -> ListFilter {
    ListFilter {
        url: Some(url.to_owned()),
        ..ListFilter::default()
    }
}

fn by_info(field: &str, value: &str) -> ListFilter {
    ListFilter {
        info: vec![(field.to_owned(), value.to_owned())],
        ..ListFilter::default()
    }
}

fn ids(records: &[ServiceRecord]) -> Vec<Ulid> {
    records.iter().map(|r| r.id).collect()
}

/// Every id of one listing, read `size` at a time.
async fn walk<S: Store>(s: &S, filter: &ListFilter, size: usize) -> Vec<Ulid> {
    let mut listing = s.listing(filter.clone(), None).await.expect("listing");
    let mut out = Vec::new();
    loop {
        let page = listing.next_page(size).await.expect("page");
        assert!(
            page.len() <= size,
            "a page of {} for size {size}",
            page.len()
        );
        if page.is_empty() {
            // Done stays done.
            assert!(listing.next_page(size).await.expect("page").is_empty());
            return out;
        }
        out.extend(page.iter().map(|r| r.id));
    }
}

/// One page of at most `size` after `cursor`, as `GET /services?limit=&cursor=` reads it: a
/// fresh listing per page.
async fn page_after<S: Store>(
    s: &S,
    filter: &ListFilter,
    cursor: Option<Ulid>,
    size: usize,
) -> Vec<Ulid> {
    let mut listing = s.listing(filter.clone(), cursor).await.expect("listing");
    let page = listing.next_page(size).await.expect("page");
    page.iter().map(|r| r.id).collect()
}

/// Every id, page by page through cursors.
async fn walk_by_cursor<S: Store>(s: &S, filter: &ListFilter, size: usize) -> Vec<Ulid> {
    let mut out: Vec<Ulid> = Vec::new();
    loop {
        let page = page_after(s, filter, out.last().copied(), size).await;
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

fn sorted(mut v: Vec<Ulid>) -> Vec<Ulid> {
    v.sort();
    v
}

/// Polls `check` until it holds; panics with `what` after `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `id` has expired (its TTL is short), without touching it otherwise.
async fn wait_gone<S: Store>(store: &S, id: Ulid) {
    let ttl = store.ttl();
    eventually(
        "the entry to expire",
        ttl + Duration::from_secs(15),
        move || async move { store.get(id).await.expect("get").is_none() },
    )
    .await;
}

/// Waits (on the wall clock, a few ms at most) until it reads later than `t`, so the next
/// store timestamp differs from `t`. Blocking, so it works on paused time too.
fn wait_past(t: Timestamp) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while Timestamp::now() <= t {
        assert!(
            std::time::Instant::now() < deadline,
            "the wall clock is stuck before {t}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// When a store call ran: it took effect somewhere between `start` and `end`, on the clock
/// expiry follows (tokio's: paused for the memory store, real for Valkey).
#[derive(Debug, Clone, Copy)]
struct Span {
    start: Instant,
    end: Instant,
}

/// Runs `call` and says when it ran.
async fn timed<T>(call: impl Future<Output = T>) -> (T, Span) {
    let start = Instant::now();
    let out = call.await;
    (
        out,
        Span {
            start,
            end: Instant::now(),
        },
    )
}

impl Span {
    /// Whether an entry that this call (re)started was certainly still live throughout
    /// `later` (with no renewal in between): `later` ended before the earliest deadline this
    /// call can have set.
    fn keeps_alive(self, ttl: Duration, later: Span) -> bool {
        later.end + CLOCK_SLACK < self.start + ttl
    }

    /// From when an entry that this call (re)started, and nothing renewed, is certainly gone.
    fn surely_expired(self, ttl: Duration) -> Instant {
        self.end + ttl + CLOCK_SLACK
    }

    /// The span from the start of `self` to the end of `other`.
    fn to(self, other: Span) -> Span {
        Span {
            start: self.start,
            end: other.end,
        }
    }
}

/// A round of an expiry test could not check what it wanted: the test was descheduled past
/// a deadline it needed to beat. Says which one.
#[derive(Debug)]
struct Missed(&'static str);

/// Runs `round` until one completes inside its timing windows, failing after [`ROUNDS`]
/// misses. On paused time nothing can be missed, so a miss fails at once.
async fn in_time<H: Harness>(what: &str, mut round: impl AsyncFnMut() -> Result<(), Missed>) {
    let mut missed = Vec::new();
    for _ in 0..ROUNDS {
        match round().await {
            Ok(()) => return,
            Err(Missed(why)) => {
                assert!(!H::PAUSED, "{what}: {why} on paused time");
                eprintln!("{what}: {why}; retrying the round");
                missed.push(why);
            }
        }
    }
    panic!("{what}: every round was descheduled past a deadline it needed: {missed:?}");
}

/// Pings `id`, whose last renewal was `prev`; returns the new renewal, or a miss when the
/// entry expired and the test had been too slow to keep it alive. Panics when it expired
/// although the ping ran within its TTL.
async fn keep_alive<S: Store>(s: &S, id: Ulid, prev: Span) -> Result<Span, Missed> {
    let (pinged, span) = timed(s.ping(id)).await;
    match pinged.expect("ping") {
        Some(p) => {
            assert_eq!(p.id, id);
            assert_eq!(p.expires_at, p.last_ping_at.saturating_add(s.ttl()));
            Ok(span)
        }
        None if prev.keeps_alive(s.ttl(), span) => {
            panic!("{id} expired although pinged within its TTL")
        }
        None => Err(Missed("a keepalive ping came after the deadline")),
    }
}

/// Some other URL with the same slot tag as `url`.
fn same_tag_url(url: &str) -> String {
    let tag = url_tag(url);
    (0..10_000_000u32)
        .map(|i| format!("http://twin-{i}.test:8000"))
        .find(|u| url_tag(u) == tag && u != url)
        .expect("a URL with the same 15-bit tag")
}

fn assert_timestamps_sane(r: &ServiceRecord, before: Timestamp, after: Timestamp, ttl: Duration) {
    let lo = before.as_millis().saturating_sub(CLOCK_SLACK_MS);
    let hi = after.as_millis() + CLOCK_SLACK_MS;
    for (what, t) in [
        ("registered_at", r.registered_at),
        ("last_updated", r.last_updated),
        ("last_ping_at", r.last_ping_at),
    ] {
        assert!(
            (lo..=hi).contains(&t.as_millis()),
            "{what} {t} not between {before} and {after}"
        );
    }
    assert_eq!(
        r.expires_at,
        r.last_ping_at.saturating_add(ttl),
        "expires_at = last_ping_at + ttl"
    );
}

fn lease(secret: &str) -> LeaseHash {
    LeaseHash::of(secret.as_bytes())
}

fn holding(secret: &str) -> Access {
    Access {
        token: Some(lease(secret)),
        admin: false,
    }
}

const ADMIN: Access = Access {
    token: None,
    admin: true,
};

fn forbidden<T: std::fmt::Debug>(what: &str, r: Result<T, StoreError>) {
    assert!(matches!(r, Err(StoreError::Forbidden)), "{what}: {r:?}");
}

// ---------------------------------------------------------------------------------------------
// Contract bodies

async fn kind_ttl_and_health<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    assert_eq!(s.kind(), H::KIND);
    assert_eq!(s.ttl(), LONG_TTL);
    let health = s.health().await.expect("health");
    assert_eq!(health.kind, H::KIND);
    assert!(
        health.latency < Duration::from_secs(2),
        "{:?}",
        health.latency
    );
}

async fn register_creates<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let url = "http://svc-a:8000";
    let before = Timestamp::now();
    let r = s
        .register(Registration {
            url: url.into(),
            info: info(json!({"display_name": "A", "version": "1.2", "team": "data"})),
            requested_id: None,
            check: None,
        })
        .await
        .expect("register");
    let after = Timestamp::now();
    assert!(r.created);
    assert!(
        id_fits_url(r.record.id, url),
        "minted id carries the URL tag"
    );
    assert_eq!(r.record.url, url);
    assert_eq!(r.record.info.display_name, "A");
    assert_eq!(r.record.info.extra["team"], "data");
    assert_eq!(r.record.registered_at, r.record.last_updated);
    assert_eq!(r.record.last_updated, r.record.last_ping_at);
    assert_timestamps_sane(&r.record, before, after, LONG_TTL);

    let got = s.get(r.record.id).await.expect("get");
    assert_eq!(got.as_ref(), Some(&r.record));
    assert_eq!(s.list(&all()).await.expect("list"), vec![r.record.clone()]);

    let other = s
        .register(reg("http://svc-b:8000", "B"))
        .await
        .expect("register");
    assert!(other.created);
    assert_ne!(other.record.id, r.record.id);
}

async fn register_is_idempotent<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let url = "http://svc-a:8000";
    let first = s
        .register(Registration {
            url: url.into(),
            info: info(json!({"display_name": "A", "version": "1", "team": "data"})),
            requested_id: None,
            check: None,
        })
        .await
        .expect("register");
    wait_past(first.record.last_updated);

    let new_info = info(json!({"display_name": "A", "version": "2", "region": "eu"}));
    let before = Timestamp::now();
    let again = s
        .register(Registration {
            url: url.into(),
            info: new_info.clone(),
            requested_id: None,
            check: None,
        })
        .await
        .expect("register again");
    let after = Timestamp::now();
    assert!(!again.created);
    assert_eq!(again.record.id, first.record.id);
    assert_eq!(again.record.registered_at, first.record.registered_at);
    assert!(again.record.last_updated > first.record.last_updated);
    assert_eq!(again.record.last_ping_at, again.record.last_updated);
    assert!(again.record.expires_at > first.record.expires_at);
    assert_eq!(again.record.info, new_info, "info replaced, not merged");
    assert!(!again.record.info.extra.contains_key("team"));
    let lo = before.as_millis().saturating_sub(CLOCK_SLACK_MS);
    assert!(
        (lo..=after.as_millis() + CLOCK_SLACK_MS).contains(&again.record.last_updated.as_millis())
    );
    assert_eq!(
        again.record.expires_at,
        again.record.last_ping_at.saturating_add(LONG_TTL)
    );

    assert_eq!(
        s.get(first.record.id).await.expect("get"),
        Some(again.record.clone())
    );
    assert_eq!(
        s.list(&all()).await.expect("list"),
        vec![again.record.clone()]
    );

    // A requested id is ignored while the URL has a live entry.
    let third = s
        .register(with_id(reg(url, "A"), mint_id(url)))
        .await
        .expect("register with another id");
    assert!(!third.created);
    assert_eq!(third.record.id, first.record.id);
    assert_eq!(h.index_len().await, H::PER_ENTRY);
}

/// Retried or racing POSTs for one URL (the reference minted a ULID per POST) give one entry.
async fn concurrent_registers_of_one_url_make_one_entry<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    for round in 0..20 {
        let url = format!("http://race-{round}:8000");
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = h.store().clone();
                let url = url.clone();
                tokio::spawn(async move { store.register(reg(&url, "R")).await })
            })
            .collect();
        let mut ids = Vec::new();
        let mut created = 0;
        for task in tasks {
            let r = task.await.expect("task").expect("register");
            created += usize::from(r.created);
            ids.push(r.record.id);
        }
        ids.dedup();
        assert_eq!(
            ids.len(),
            1,
            "round {round}: one id for one URL, got {ids:?}"
        );
        assert_eq!(
            created, 1,
            "round {round}: exactly one registration created the entry"
        );
    }
    assert_eq!(h.store().list(&all()).await.expect("list").len(), 20);
    assert_eq!(h.index_len().await, 20 * H::PER_ENTRY);
}

async fn reregister_restarts_the_ttl<H: Harness>() {
    let ttl = EXPIRY_TTL;
    in_time::<H>("reregister_restarts_the_ttl", async || {
        let h = H::open(ttl).await;
        let s = h.store();
        let url = "http://svc-a:8000";
        let (first, r1) = timed(s.register(reg(url, "A"))).await;
        let first = first.expect("register");
        // Re-register half way through the TTL...
        tokio::time::sleep(ttl / 2).await;
        wait_past(first.record.last_updated);
        let (again, r2) = timed(s.register(reg(url, "A"))).await;
        let again = again.expect("register again");
        if !r1.keeps_alive(ttl, r2) {
            return Err(Missed("re-registered after the first deadline"));
        }
        assert!(!again.created);
        assert_eq!(again.record.id, first.record.id);
        assert!(again.record.expires_at > first.record.expires_at);
        // ...and it outlives the first deadline.
        tokio::time::sleep_until(r1.surely_expired(ttl)).await;
        let (got, g) = timed(s.get(first.record.id)).await;
        if !r2.keeps_alive(ttl, g) {
            return Err(Missed("looked after the second deadline"));
        }
        let got = got.expect("get");
        assert!(got.is_some(), "re-registration restarted the TTL");
        assert_eq!(got.map(|r| r.expires_at), Some(again.record.expires_at));
        // It still expires in the end.
        wait_gone(s, first.record.id).await;
        Ok(())
    })
    .await;
}

async fn requested_id_is_kept_after_expiry<H: Harness>() {
    let h = H::open(EXPIRY_TTL).await;
    let s = h.store();
    let url = "http://svc-a:8000";
    let first = s.register(reg(url, "A")).await.expect("register");
    wait_gone(s, first.record.id).await;
    wait_past(first.record.registered_at);
    assert!(s.list(&by_url(url)).await.expect("list").is_empty());

    let back = s
        .register(with_id(reg(url, "A"), first.record.id))
        .await
        .expect("register with the old id");
    assert!(back.created, "the old entry had expired");
    assert_eq!(back.record.id, first.record.id, "requested id kept");
    assert!(back.record.registered_at > first.record.registered_at);
    assert_eq!(
        s.get(first.record.id).await.expect("get"),
        Some(back.record.clone())
    );
    assert_eq!(
        ids(&s.list(&by_url(url)).await.expect("list")),
        vec![first.record.id]
    );
}

async fn requested_id_of_another_url_gets_a_fresh_id<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let url_a = "http://svc-a:8000";
    let url_b = same_tag_url(url_a);
    let a = s.register(reg(url_a, "A")).await.expect("register A");
    assert!(
        id_fits_url(a.record.id, &url_b),
        "precondition: the id fits both URLs"
    );

    let b = s
        .register(with_id(reg(&url_b, "B"), a.record.id))
        .await
        .expect("register B with A's id");
    assert!(b.created);
    assert_ne!(
        b.record.id, a.record.id,
        "an id in use is not handed out twice"
    );
    assert!(id_fits_url(b.record.id, &url_b));
    assert_eq!(b.record.url, url_b);

    let still_a = s.get(a.record.id).await.expect("get A");
    assert_eq!(still_a.map(|r| r.url), Some(url_a.to_owned()));
    assert_eq!(
        s.get(b.record.id).await.expect("get B").map(|r| r.url),
        Some(url_b.clone())
    );
    assert_eq!(s.list(&all()).await.expect("list"), {
        let mut v = vec![a.record.clone(), b.record.clone()];
        v.sort_by_key(|r| r.id);
        v
    });
}

async fn requested_id_not_fitting_the_url_gets_a_fresh_id<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let url = "http://svc-a:8000";
    let foreign = mint_id("http://elsewhere:9000");
    assert!(!id_fits_url(foreign, url), "precondition: tags differ");
    let r = s
        .register(with_id(reg(url, "A"), foreign))
        .await
        .expect("register");
    assert!(r.created);
    assert_ne!(r.record.id, foreign);
    assert!(id_fits_url(r.record.id, url));
    assert!(s.get(foreign).await.expect("get").is_none());
}

/// Finding 3 of issue 9: an attacker with a URL of the same slot tag deletes the victim and
/// registers presenting the victim's id. It gets a fresh id, and the victim's pings never
/// answer for the attacker's entry. The victim itself gets its id back.
async fn a_deregistered_id_is_never_handed_to_another_url<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let victim = "http://victim:8000";
    let attacker = same_tag_url(victim);
    let v = s.register(reg(victim, "V")).await.expect("register victim");
    let id = v.record.id;
    assert!(id_fits_url(id, &attacker), "precondition: same tag");
    s.deregister(id)
        .await
        .expect("deregister")
        .expect("existed");

    let a = s
        .register(with_id(reg(&attacker, "A"), id))
        .await
        .expect("register attacker");
    assert!(a.created);
    assert_ne!(
        a.record.id, id,
        "the victim's id is not handed to another URL"
    );
    assert!(
        s.ping(id).await.expect("ping").is_none(),
        "victim's ping: 404"
    );
    assert!(s.get(id).await.expect("get").is_none());
    assert_eq!(
        s.list(&by_url(&attacker)).await.expect("list").len(),
        1,
        "one entry for the attacker, under its own id"
    );
    // A second try after the attacker deregisters fares no better.
    s.deregister(a.record.id)
        .await
        .expect("deregister")
        .expect("existed");
    let again = s
        .register(with_id(reg(&attacker, "A"), id))
        .await
        .expect("register attacker again");
    assert_ne!(again.record.id, id);

    // The victim presenting its own id gets it back: its tombstone names its URL.
    let back = s
        .register(with_id(reg(victim, "V"), id))
        .await
        .expect("victim back");
    assert!(back.created);
    assert_eq!(back.record.id, id);
    assert_eq!(
        s.ping(id).await.expect("ping").map(|p| p.id),
        Some(id),
        "the victim's pings answer for the victim"
    );
    assert_eq!(
        s.get(id).await.expect("get").map(|r| r.url),
        Some(victim.to_owned())
    );
}

/// The same attack on an entry that expired instead of being deleted.
async fn an_expired_id_is_never_handed_to_another_url<H: Harness>() {
    let ttl = EXPIRY_TTL;
    in_time::<H>("an_expired_id_is_never_handed_to_another_url", async || {
        let h = H::open(ttl).await;
        let s = h.store();
        let victim = "http://victim:8000";
        let attacker = same_tag_url(victim);
        let (v, registered) = timed(s.register(reg(victim, "V"))).await;
        let id = v.expect("register victim").record.id;
        wait_gone(s, id).await;
        let a = s
            .register(with_id(reg(&attacker, "A"), id))
            .await
            .expect("register attacker");
        assert!(a.created);
        assert_ne!(
            a.record.id, id,
            "an expired id is not handed to another URL"
        );
        assert!(
            s.ping(id).await.expect("ping").is_none(),
            "victim's ping: 404"
        );
        assert!(s.get(id).await.expect("get").is_none());
        // Within the grace after the expiry, the victim gets its id back.
        let (back, b) = timed(s.register(with_id(reg(victim, "V"), id))).await;
        if registered.end + ttl + binding_grace(ttl) <= b.end + CLOCK_SLACK {
            return Err(Missed("came back after the binding ended"));
        }
        let back = back.expect("victim back");
        assert!(back.created);
        assert_eq!(back.record.id, id, "the binding outlived the record");
        Ok(())
    })
    .await;
}

/// A URL's binding to its id lasts the grace past the entry's expiry, not forever. (The grace
/// is set to the shortest allowed, one TTL, so the test need not wait a minute.)
async fn a_binding_ends_one_ttl_after_expiry<H: Harness>() {
    let ttl = EXPIRY_TTL;
    let h = H::open(ttl).await.with_grace(Duration::ZERO);
    let s = h.store();
    let url = "http://svc-a:8000";
    let (first, registered) = timed(s.register(reg(url, "A"))).await;
    let id = first.expect("register").record.id;
    tokio::time::sleep_until(registered.surely_expired(2 * ttl)).await;
    s.sweep().await.expect("sweep");
    let later = s
        .register(with_id(reg(url, "A"), id))
        .await
        .expect("register again");
    assert!(later.created);
    assert_ne!(later.record.id, id, "a new id after the grace");
    assert!(id_fits_url(later.record.id, url));
}

async fn a_lease_guards_every_write_of_its_entry<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let url = "http://leased:8000";
    let r = s
        .register_as(reg(url, "L"), Access::default(), Some(lease("one")))
        .await
        .expect("register leased");
    assert!(r.created);
    assert_eq!(r.lease, LeaseOutcome::New);
    let id = r.record.id;

    // Nobody else writes it: no token, a wrong token.
    for access in [Access::default(), holding("wrong")] {
        forbidden("ping", s.ping_as(id, access).await);
        forbidden("deregister", s.deregister_as(id, access).await);
        forbidden(
            "re-register",
            s.register_as(reg(url, "Hijacked"), access, Some(lease("mine")))
                .await,
        );
    }
    forbidden("plain ping", s.ping(id).await);
    forbidden("plain deregister", s.deregister(id).await);
    forbidden("plain register", s.register(reg(url, "Hijacked")).await);
    let still = s.get(id).await.expect("get").expect("untouched");
    assert_eq!(still, r.record, "refused writes changed nothing");
    assert!(s.list(&by_name("Hijacked")).await.expect("list").is_empty());

    // The holder does all of it; asking for a new lease keeps the one it holds.
    let pinged = s.ping_as(id, holding("one")).await.expect("ping");
    assert_eq!(pinged.map(|p| p.id), Some(id));
    let again = s
        .register_as(reg(url, "L2"), holding("one"), Some(lease("two")))
        .await
        .expect("re-register");
    assert!(!again.created);
    assert_eq!(again.record.id, id);
    assert_eq!(again.lease, LeaseOutcome::Kept);
    forbidden("the unused new lease", s.ping_as(id, holding("two")).await);

    // The admin does any write: without asking, the lease stays; asking replaces it.
    assert!(s.ping_as(id, ADMIN).await.expect("admin ping").is_some());
    let held = s
        .register_as(reg(url, "L3"), ADMIN, None)
        .await
        .expect("admin re-register");
    assert_eq!(held.lease, LeaseOutcome::Held);
    assert!(s.ping_as(id, holding("one")).await.expect("ping").is_some());
    let replaced = s
        .register_as(reg(url, "L4"), ADMIN, Some(lease("three")))
        .await
        .expect("admin takes over");
    assert_eq!(replaced.lease, LeaseOutcome::New);
    forbidden("the old lease", s.ping_as(id, holding("one")).await);
    let gone = s
        .deregister_as(id, holding("three"))
        .await
        .expect("deregister")
        .expect("existed");
    assert_eq!(gone.info.display_name, "L4");

    // Deregistered: the URL is free for anyone, without a lease.
    let free = s.register(reg(url, "Free")).await.expect("register");
    assert!(free.created);
    assert_eq!(free.lease, LeaseOutcome::None);
    assert!(s.ping(free.record.id).await.expect("ping").is_some());
    assert_eq!(h.index_len().await, H::PER_ENTRY);
}

async fn an_unleased_entry_can_take_a_lease<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let url = "http://plain:8000";
    let plain = s.register(reg(url, "P")).await.expect("register");
    assert_eq!(plain.lease, LeaseOutcome::None);
    let id = plain.record.id;
    // Presenting some token to an unleased entry is harmless.
    assert!(s.ping_as(id, holding("x")).await.expect("ping").is_some());
    let leased = s
        .register_as(reg(url, "P"), Access::default(), Some(lease("now")))
        .await
        .expect("take a lease");
    assert!(!leased.created);
    assert_eq!(leased.record.id, id);
    assert_eq!(leased.lease, LeaseOutcome::New);
    forbidden("plain ping", s.ping(id).await);
    assert!(s.ping_as(id, holding("now")).await.expect("ping").is_some());
}

/// A lease ends with its entry: after expiry the URL is anyone's.
async fn an_expired_lease_frees_the_url<H: Harness>() {
    let h = H::open(EXPIRY_TTL).await;
    let s = h.store();
    let url = "http://leased:8000";
    let r = s
        .register_as(reg(url, "L"), Access::default(), Some(lease("one")))
        .await
        .expect("register leased");
    wait_gone(s, r.record.id).await;
    let next = s.register(reg(url, "M")).await.expect("register");
    assert!(next.created);
    assert_eq!(next.lease, LeaseOutcome::None);
    assert!(s.ping(next.record.id).await.expect("ping").is_some());
    assert!(s
        .deregister(next.record.id)
        .await
        .expect("deregister")
        .is_some());
}

async fn unknown_ids_are_none<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let known = s
        .register(reg("http://svc-a:8000", "A"))
        .await
        .expect("register");
    let unknown = mint_id("http://svc-a:8000");
    assert_ne!(unknown, known.record.id);
    assert!(s.get(unknown).await.expect("get").is_none());
    assert!(s.deregister(unknown).await.expect("deregister").is_none());
    assert!(s.ping(unknown).await.expect("ping").is_none());
    assert!(s.get(Ulid::new()).await.expect("get").is_none());
    // The unknown id did not disturb the known one.
    assert_eq!(
        s.get(known.record.id).await.expect("get"),
        Some(known.record)
    );
}

async fn deregister_returns_the_record_and_hides_it<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let url = "http://svc-a:8000";
    let a = s
        .register(Registration {
            url: url.into(),
            info: info(json!({"display_name": "A", "team": "data"})),
            requested_id: None,
            check: None,
        })
        .await
        .expect("register A");
    let b = s
        .register(reg("http://svc-b:8000", "B"))
        .await
        .expect("register B");
    let pinged = s.ping(a.record.id).await.expect("ping").expect("alive");

    let gone = s.deregister(a.record.id).await.expect("deregister");
    let mut expected = a.record.clone();
    expected.last_ping_at = pinged.last_ping_at;
    expected.expires_at = pinged.expires_at;
    assert_eq!(gone, Some(expected), "returns the record as it was");

    assert!(s.get(a.record.id).await.expect("get").is_none());
    assert!(s.ping(a.record.id).await.expect("ping").is_none());
    assert!(s
        .deregister(a.record.id)
        .await
        .expect("deregister again")
        .is_none());
    assert_eq!(ids(&s.list(&all()).await.expect("list")), vec![b.record.id]);
    assert!(s.list(&by_url(url)).await.expect("list").is_empty());
    assert!(s.list(&by_name("A")).await.expect("list").is_empty());
    assert!(s
        .list(&by_info("team", "data"))
        .await
        .expect("list")
        .is_empty());
    assert_eq!(h.index_len().await, H::PER_ENTRY, "only B stays indexed");

    // The URL is free again: a new registration creates a fresh entry.
    let again = s.register(reg(url, "A")).await.expect("register again");
    assert!(again.created);
    assert_ne!(again.record.id, a.record.id);
}

async fn ping_extends_life<H: Harness>() {
    const PINGS: u32 = 10;
    let ttl = EXPIRY_TTL;
    in_time::<H>("ping_extends_life", async || {
        let h = H::open(ttl).await;
        let s = h.store();
        let url = "http://svc-a:8000";
        let (r, registered) = timed(s.register(reg(url, "A"))).await;
        let r = r.expect("register");
        let id = r.record.id;
        let mut last = r.record.last_ping_at;
        let mut renewed = registered;
        // Pings every quarter TTL, for two and a half TTLs.
        for _ in 0..PINGS {
            tokio::time::sleep(ttl / 4).await;
            let (p, span) = timed(s.ping(id)).await;
            match p.expect("ping") {
                Some(p) => {
                    assert_eq!(p.id, id);
                    assert!(p.last_ping_at >= last);
                    assert_eq!(p.expires_at, p.last_ping_at.saturating_add(ttl));
                    last = p.last_ping_at;
                }
                None if renewed.keeps_alive(ttl, span) => panic!("expired although pinged"),
                None => return Err(Missed("a ping came after the deadline")),
            }
            renewed = span;
        }
        let ((got, all_ids, named, at_url, again), looked) = timed(async {
            (
                s.get(id).await.expect("get"),
                ids(&s.list(&all()).await.expect("list")),
                ids(&s.list(&by_name("A")).await.expect("list")),
                ids(&s.list(&by_url(url)).await.expect("list")),
                // Re-registering the URL after pings finds the same entry.
                s.register(reg(url, "A")).await.expect("register"),
            )
        })
        .await;
        if !renewed.keeps_alive(ttl, looked) {
            return Err(Missed("looked after the last ping's deadline"));
        }
        assert!(
            looked.start > registered.surely_expired(ttl),
            "the pings went on past the first deadline"
        );
        let got = got.expect("alive long past its first deadline");
        assert_eq!(got.last_ping_at, last);
        assert_eq!(got.registered_at, r.record.registered_at);
        assert_eq!(
            got.last_updated, r.record.last_updated,
            "ping is not an update"
        );
        assert_eq!(all_ids, vec![id]);
        assert_eq!(named, vec![id]);
        assert_eq!(at_url, vec![id]);
        assert!(!again.created);
        assert_eq!(again.record.id, id);
        Ok(())
    })
    .await;
}

async fn ping_of_expired_is_none_and_stays_gone<H: Harness>() {
    let h = H::open(EXPIRY_TTL).await;
    let s = h.store();
    let url = "http://svc-a:8000";
    let r = s.register(reg(url, "A")).await.expect("register");
    wait_gone(s, r.record.id).await;
    assert!(s.ping(r.record.id).await.expect("ping").is_none());
    assert!(s.get(r.record.id).await.expect("get").is_none());
    assert!(s.ping(r.record.id).await.expect("ping again").is_none());
    assert!(s.list(&all()).await.expect("list").is_empty());
    assert!(s.list(&by_url(url)).await.expect("list").is_empty());
    // The URL is free: registering it creates an entry.
    assert!(s.register(reg(url, "A")).await.expect("register").created);
}

async fn ping_and_deregister_race_leaves_nothing<H: Harness>() {
    const ROUNDS: usize = 200;
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let mut seen = Vec::with_capacity(ROUNDS);
    let mut pings_won = 0;
    for round in 0..ROUNDS {
        let url = format!("http://race-{}:8000", round % 7);
        let r = s.register(reg(&url, "R")).await.expect("register");
        assert!(
            r.created,
            "round {round}: the previous round left {url} behind"
        );
        let id = r.record.id;
        seen.push(id);
        let pinger = {
            let s = s.clone();
            async move { s.ping(id).await }
        };
        let deleter = {
            let s = s.clone();
            async move { s.deregister(id).await }
        };
        let (pinged, deleted) = if round % 2 == 0 {
            let p = tokio::spawn(pinger);
            let d = tokio::spawn(deleter);
            (p.await, d.await)
        } else {
            let d = tokio::spawn(deleter);
            let p = tokio::spawn(pinger);
            (p.await, d.await)
        };
        let pinged = pinged.expect("ping task").expect("ping");
        let deleted = deleted.expect("deregister task").expect("deregister");
        assert_eq!(
            deleted.map(|r| r.id),
            Some(id),
            "round {round}: deregister saw the entry"
        );
        if pinged.is_some() {
            pings_won += 1;
        }
        assert!(
            s.get(id).await.expect("get").is_none(),
            "round {round}: resurrected by ping"
        );
        assert!(
            s.ping(id).await.expect("ping").is_none(),
            "round {round}: ping after delete"
        );
    }
    let listed = s.list(&all()).await.expect("list");
    assert!(listed.is_empty(), "left behind: {:?}", ids(&listed));
    for i in 0..7 {
        let url = format!("http://race-{i}:8000");
        assert!(s.list(&by_url(&url)).await.expect("list").is_empty());
    }
    assert!(s.list(&by_name("R")).await.expect("list").is_empty());
    assert_eq!(h.index_len().await, 0, "no index entries left");
    for id in seen {
        assert!(s.get(id).await.expect("get").is_none());
    }
    // Not an assertion on the outcome of a race, only a hint when reading the output.
    eprintln!("ping won {pings_won}/{ROUNDS} races");
}

async fn expired_entries_are_never_listed<H: Harness>() {
    let ttl = EXPIRY_TTL;
    in_time::<H>("expired_entries_are_never_listed", async || {
        let h = H::open(ttl).await;
        let s = h.store();
        let (dying, d) = timed(s.register(Registration {
            url: "http://dying:8000".into(),
            info: info(json!({"display_name": "D", "team": "data"})),
            requested_id: None,
            check: None,
        }))
        .await;
        let (living, l) = timed(s.register(Registration {
            url: "http://living:8000".into(),
            info: info(json!({"display_name": "L", "team": "data"})),
            requested_id: None,
            check: None,
        }))
        .await;
        let dying_id = dying.expect("register").record.id;
        let living_id = living.expect("register").record.id;
        // Keep one alive by pinging while the other expires; no sweep runs.
        let mut renewed = l;
        let give_up = d.surely_expired(ttl) + Duration::from_secs(15);
        loop {
            renewed = keep_alive(s, living_id, renewed).await?;
            if s.get(dying_id).await.expect("get").is_none() {
                break;
            }
            assert!(Instant::now() < give_up, "D never expired");
            tokio::time::sleep(ttl / 10).await;
        }
        let ((listed, named_d, at_url, team, named_l), looked) = timed(async {
            (
                ids(&s.list(&all()).await.expect("list")),
                ids(&s.list(&by_name("D")).await.expect("list")),
                ids(&s.list(&by_url("http://dying:8000")).await.expect("list")),
                ids(&s.list(&by_info("team", "data")).await.expect("list")),
                ids(&s.list(&by_name("L")).await.expect("list")),
            )
        })
        .await;
        if !renewed.keeps_alive(ttl, looked) {
            return Err(Missed("listed after the last ping's deadline"));
        }
        assert_eq!(listed, vec![living_id]);
        assert!(named_d.is_empty());
        assert!(at_url.is_empty());
        assert_eq!(team, vec![living_id]);
        assert_eq!(named_l, vec![living_id]);
        Ok(())
    })
    .await;
}

async fn list_filters<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let s1 = s
        .register(Registration {
            url: "http://s1:8000".into(),
            info: info(
                json!({"display_name": "alpha", "version": "1.0", "team": "data",
                "priority": 5, "gpu": true, "capabilities": ["ml", "etl"]}),
            ),
            requested_id: None,
            check: None,
        })
        .await
        .expect("register s1")
        .record
        .id;
    let s2 = s
        .register(Registration {
            url: "http://s2:8000".into(),
            info: info(
                json!({"display_name": "alpha", "version": "2.0", "team": "web",
                "priority": 3, "gpu": false, "capabilities": ["web"]}),
            ),
            requested_id: None,
            check: None,
        })
        .await
        .expect("register s2")
        .record
        .id;
    let s3 = s
        .register(Registration {
            url: "http://s3:8000".into(),
            info: info(
                json!({"display_name": "beta", "team": "data", "priority": 5.0,
                "capabilities": ["etl"]}),
            ),
            requested_id: None,
            check: None,
        })
        .await
        .expect("register s3")
        .record
        .id;
    let list = |f: ListFilter| async move { ids(&s.list(&f).await.expect("list")) };

    assert_eq!(
        list(all()).await,
        sorted(vec![s1, s2, s3]),
        "all, in id order"
    );
    assert_eq!(list(by_name("alpha")).await, sorted(vec![s1, s2]));
    assert_eq!(list(by_name("beta")).await, vec![s3]);
    assert_eq!(list(by_name("gamma")).await, Vec::<Ulid>::new());
    assert_eq!(
        list(by_name("Alpha")).await,
        Vec::<Ulid>::new(),
        "names are exact"
    );
    assert_eq!(list(by_url("http://s2:8000")).await, vec![s2]);
    assert_eq!(list(by_url("http://s4:8000")).await, Vec::<Ulid>::new());
    // Strings.
    assert_eq!(list(by_info("team", "data")).await, sorted(vec![s1, s3]));
    assert_eq!(list(by_info("version", "2.0")).await, vec![s2]);
    assert_eq!(list(by_info("team", "ops")).await, Vec::<Ulid>::new());
    // Numbers, also across integer and float spellings.
    assert_eq!(list(by_info("priority", "5")).await, sorted(vec![s1, s3]));
    assert_eq!(list(by_info("priority", "3")).await, vec![s2]);
    // Booleans.
    assert_eq!(list(by_info("gpu", "true")).await, vec![s1]);
    assert_eq!(list(by_info("gpu", "false")).await, vec![s2]);
    // Array membership.
    assert_eq!(
        list(by_info("capabilities", "etl")).await,
        sorted(vec![s1, s3])
    );
    assert_eq!(list(by_info("capabilities", "web")).await, vec![s2]);
    assert_eq!(
        list(by_info("capabilities", "gpu")).await,
        Vec::<Ulid>::new()
    );
    // Missing fields never match.
    assert_eq!(list(by_info("region", "eu")).await, Vec::<Ulid>::new());
    // Combined conditions must all hold.
    let combined = |name: Option<&str>, url: Option<&str>, info: &[(&str, &str)]| ListFilter {
        display_name: name.map(str::to_owned),
        url: url.map(str::to_owned),
        info: info
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        health: vec![],
    };
    assert_eq!(
        list(combined(Some("alpha"), None, &[("team", "data")])).await,
        vec![s1]
    );
    assert_eq!(
        list(combined(
            None,
            None,
            &[("team", "data"), ("capabilities", "ml")]
        ))
        .await,
        vec![s1]
    );
    assert_eq!(
        list(combined(None, None, &[("team", "data"), ("gpu", "false")])).await,
        Vec::<Ulid>::new()
    );
    assert_eq!(
        list(combined(Some("beta"), Some("http://s3:8000"), &[])).await,
        vec![s3]
    );
    assert_eq!(
        list(combined(Some("beta"), Some("http://s1:8000"), &[])).await,
        Vec::<Ulid>::new()
    );
    assert_eq!(
        list(combined(None, Some("http://s1:8000"), &[("priority", "3")])).await,
        Vec::<Ulid>::new()
    );
}

async fn pages_return_every_entry_once_in_id_order<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let mut want = Vec::new();
    for i in 0..23 {
        let r = s.register(reg(&format!("http://p{i}:8000"), "P")).await;
        want.push(r.expect("register").record.id);
    }
    let want = sorted(want);
    assert_eq!(ids(&s.list(&all()).await.expect("list")), want);
    for size in [1, 2, 5, 22, 23, 24, 1000] {
        assert_eq!(
            walk(s, &all(), size).await,
            want,
            "one listing, pages of {size}"
        );
        assert_eq!(
            walk_by_cursor(s, &all(), size).await,
            want,
            "cursors, pages of {size}"
        );
    }
    // A listing starts after its cursor, whatever the cursor is.
    assert_eq!(page_after(s, &all(), Some(want[9]), 3).await, want[10..13]);
    assert_eq!(
        page_after(s, &all(), Some(want[22]), 3).await,
        Vec::<Ulid>::new()
    );
    assert_eq!(page_after(s, &all(), Some(Ulid(0)), 2).await, want[..2]);
    assert!(page_after(s, &all(), Some(Ulid(u128::MAX)), 2)
        .await
        .is_empty());
    assert_eq!(h.store().count().await.expect("count"), 23);
}

async fn pages_honour_every_filter<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let mut registered = Vec::new();
    for i in 0..20 {
        let name = if i % 2 == 0 { "even" } else { "odd" };
        let team = if i % 3 == 0 { "data" } else { "web" };
        let r = Registration {
            url: format!("http://f{i}:8000"),
            info: info(json!({"display_name": name, "team": team})),
            requested_id: None,
            check: None,
        };
        registered.push((i, s.register(r).await.expect("register").record.id));
    }
    let matching = |keep: &dyn Fn(usize) -> bool| {
        sorted(
            registered
                .iter()
                .filter(|(i, _)| keep(*i))
                .map(|(_, id)| *id)
                .collect(),
        )
    };
    let both = ListFilter {
        display_name: Some("even".into()),
        info: vec![("team".into(), "data".into())],
        url: None,
        health: vec![],
    };
    let cases = [
        (by_name("even"), matching(&|i| i % 2 == 0)),
        (by_info("team", "data"), matching(&|i| i % 3 == 0)),
        (both, matching(&|i| i % 6 == 0)),
        (by_url("http://f7:8000"), matching(&|i| i == 7)),
        (by_name("none"), Vec::new()),
    ];
    for (filter, want) in &cases {
        for size in [1, 3, 50] {
            assert_eq!(walk(s, filter, size).await, *want, "{filter:?}, {size}");
            assert_eq!(
                walk_by_cursor(s, filter, size).await,
                *want,
                "{filter:?}, cursors, {size}"
            );
        }
    }
    // A cursor past the one URL match: nothing.
    let (_, f7) = registered[7];
    assert!(page_after(s, &by_url("http://f7:8000"), Some(f7), 5)
        .await
        .is_empty());
}

/// Entries live from the first page to the last are returned exactly once, in id order;
/// entries removed before their page never; entries added meanwhile at most once.
async fn pages_across_registrations_and_removals<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    for by_cursor in [false, true] {
        let round = usize::from(by_cursor);
        let mut ids_ = Vec::new();
        for i in 0..12 {
            let url = format!("http://c{round}-{i}:8000");
            ids_.push(
                s.register(reg(&url, "C"))
                    .await
                    .expect("register")
                    .record
                    .id,
            );
        }
        let ids_ = sorted(ids_);
        let mut listing = s.listing(all(), None).await.expect("listing");
        let mut seen: Vec<Ulid> = Vec::new();
        let mut step = 0;
        loop {
            let page: Vec<Ulid> = if by_cursor {
                page_after(s, &all(), seen.last().copied(), 3).await
            } else {
                let page = listing.next_page(3).await.expect("page");
                page.iter().map(|r| r.id).collect()
            };
            if page.is_empty() {
                break;
            }
            seen.extend(page);
            match step {
                0 => {
                    // Not reached yet, removed: never listed.
                    s.deregister(ids_[9]).await.expect("deregister");
                    // Already listed, removed: no effect on what follows.
                    s.deregister(ids_[0]).await.expect("deregister");
                    // Positions in id order, not URLs: ids minted in one millisecond are in
                    // random order, so `c-7` need not be ids_[7].
                    let url_of =
                        |id: Ulid| async move { s.get(id).await.expect("get").expect("live").url };
                    // Not reached yet, renewed under another name: listed once.
                    s.register(reg(&url_of(ids_[7]).await, "renamed"))
                        .await
                        .expect("renew");
                    // Already listed, renewed: not listed again.
                    s.register(reg(&url_of(ids_[1]).await, "renamed"))
                        .await
                        .expect("renew");
                }
                1 => {
                    let url = format!("http://c{round}-new:8000");
                    s.register(reg(&url, "C")).await.expect("register");
                }
                _ => {}
            }
            step += 1;
        }
        let what = if by_cursor { "cursors" } else { "one listing" };
        let mut unique = seen.clone();
        unique.dedup();
        assert_eq!(unique, seen, "{what}: in id order, each once: {seen:?}");
        assert_eq!(sorted(seen.clone()), seen, "{what}: id order");
        let stayed: Vec<Ulid> = ids_
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 9)
            .map(|(_, id)| *id)
            .collect();
        for id in &stayed {
            assert!(
                seen.contains(id),
                "{what}: {id} lived throughout, not listed"
            );
        }
        assert!(!seen.contains(&ids_[9]), "{what}: removed before its page");
        assert!(
            seen.len() <= stayed.len() + 1,
            "{what}: {seen:?} of {ids_:?}"
        );
        // Clean slate for the next round.
        for id in s.list(&all()).await.expect("list").iter().map(|r| r.id) {
            s.deregister(id).await.expect("deregister");
        }
    }
}

async fn display_name_change_moves_between_indexes<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let url = "http://svc-a:8000";
    let first = s.register(reg(url, "old")).await.expect("register");
    assert_eq!(
        ids(&s.list(&by_name("old")).await.expect("list")),
        vec![first.record.id]
    );

    let moved = s.register(reg(url, "new")).await.expect("re-register");
    assert!(!moved.created);
    assert_eq!(moved.record.id, first.record.id);
    assert!(s.list(&by_name("old")).await.expect("list").is_empty());
    assert_eq!(
        ids(&s.list(&by_name("new")).await.expect("list")),
        vec![first.record.id]
    );
    assert_eq!(
        h.index_len().await,
        H::PER_ENTRY,
        "no entry left in the old name's index"
    );

    // And back again.
    s.register(reg(url, "old")).await.expect("re-register");
    assert!(s.list(&by_name("new")).await.expect("list").is_empty());
    assert_eq!(
        ids(&s.list(&by_name("old")).await.expect("list")),
        vec![first.record.id]
    );
    assert_eq!(h.index_len().await, H::PER_ENTRY);
}

async fn sweep_drops_dead_index_entries<H: Harness>() {
    let ttl = EXPIRY_TTL;
    in_time::<H>("sweep_drops_dead_index_entries", async || {
        let h = H::open(ttl).await;
        let s = h.store();
        let mut dead = Vec::new();
        let mut registered: Option<Span> = None;
        for (i, name) in ["x", "y", "x"].iter().enumerate() {
            let (r, span) = timed(s.register(reg(&format!("http://dead-{i}:8000"), name))).await;
            dead.push(r.expect("register").record.id);
            registered = Some(registered.map_or(span, |first| first.to(span)));
        }
        let Some(registered) = registered else {
            unreachable!("three registrations")
        };
        let (keeper, k) = timed(s.register(reg("http://keeper:8000", "k"))).await;
        let keeper = keeper.expect("register").record.id;
        assert_eq!(h.index_len().await, 4 * H::PER_ENTRY);
        let (swept, sw) = timed(s.sweep()).await;
        if !registered.keeps_alive(ttl, sw) {
            return Err(Missed("swept after the first deadline"));
        }
        assert_eq!(swept.expect("sweep"), 0, "nothing expired yet");
        assert_eq!(
            h.index_len().await,
            4 * H::PER_ENTRY,
            "sweep keeps live entries"
        );

        // Wait out their TTL, keeping the keeper alive; nothing reads the dead ones (a read
        // may clean up on its own, and this test is about the sweeper).
        let mut renewed = k;
        let dead_by = registered.surely_expired(ttl);
        while Instant::now() <= dead_by {
            renewed = keep_alive(s, keeper, renewed).await?;
            tokio::time::sleep(ttl / 5).await;
        }
        renewed = keep_alive(s, keeper, renewed).await?;
        assert_eq!(
            h.index_len().await,
            4 * H::PER_ENTRY,
            "nothing dropped them before the sweep"
        );
        let ((dropped, left, dead_got, listed, named_k, named_x, again, left_again), looked) =
            timed(async {
                let dropped = s.sweep().await.expect("sweep");
                let left = h.index_len().await;
                let mut dead_got = Vec::new();
                for id in &dead {
                    dead_got.push(s.get(*id).await.expect("get"));
                }
                (
                    dropped,
                    left,
                    dead_got,
                    ids(&s.list(&all()).await.expect("list")),
                    ids(&s.list(&by_name("k")).await.expect("list")),
                    ids(&s.list(&by_name("x")).await.expect("list")),
                    s.sweep().await.expect("sweep again"),
                    h.index_len().await,
                )
            })
            .await;
        if !renewed.keeps_alive(ttl, looked) {
            return Err(Missed("swept after the keeper's deadline"));
        }
        assert!(dropped >= dead.len(), "dropped {dropped}");
        assert_eq!(left, H::PER_ENTRY, "only the keeper stays indexed");
        assert!(dead_got.iter().all(Option::is_none), "{dead_got:?}");
        assert_eq!(listed, vec![keeper]);
        assert_eq!(named_k, vec![keeper]);
        assert!(named_x.is_empty());
        assert_eq!(again, 0);
        assert_eq!(left_again, H::PER_ENTRY);

        // Once the keeper expires too, everything goes.
        tokio::time::sleep_until(renewed.surely_expired(ttl)).await;
        assert!(s.sweep().await.expect("sweep") >= 1);
        assert_eq!(h.index_len().await, 0);
        assert!(s.get(keeper).await.expect("get").is_none());
        Ok(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Valkey only: the documented key layout and connection behaviour.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_key_layout() {
    let h = Valkey::open(LONG_TTL).await;
    let c = h.store.client();
    let url = "http://svc-a:8000";
    let r = h
        .store
        .register(Registration {
            url: url.into(),
            info: info(json!({"display_name": "A", "team": "data"})),
            requested_id: None,
            check: None,
        })
        .await
        .expect("register")
        .record;
    let svc = h.svc_key(r.id);
    // One string: four 13-digit timestamps, then `<len>:<url><len>:<name><info JSON>`.
    let kind: String = c.r#type(&svc).await.expect("TYPE");
    assert_eq!(kind, "string");
    let value: String = c.get(&svc).await.expect("GET");
    let header = format!(
        "{:013}{:013}{:013}{:013}",
        r.registered_at.as_millis(),
        r.last_updated.as_millis(),
        r.last_ping_at.as_millis(),
        r.expires_at.as_millis()
    );
    assert_eq!(value[..52], header);
    let body = &value[52..];
    let prefix = format!("{}:{url}1:A", url.len());
    assert!(body.starts_with(&prefix), "body {body:?}");
    let stored: ServiceInfo = serde_json::from_str(&body[prefix.len()..]).expect("info JSON");
    assert_eq!(stored, r.info);
    let encoding: String = c
        .custom(
            CustomCommand::new_static("OBJECT", ClusterHash::Custom(0), false),
            vec!["ENCODING".to_owned(), svc.clone()],
        )
        .await
        .expect("OBJECT ENCODING");
    assert!(
        ["raw", "embstr"].contains(&encoding.as_str()),
        "a plain string, {encoding}"
    );
    let ttl_ms = LONG_TTL.as_millis() as i64;
    let svc_pttl: i64 = c.pttl(&svc).await.expect("PTTL");
    assert!(
        svc_pttl > ttl_ms - 5_000 && svc_pttl <= ttl_ms,
        "record PTTL {svc_pttl}"
    );
    let url_key = h.url_key(r.id, url);
    let stored_id: Option<String> = c.get(&url_key).await.expect("GET");
    assert_eq!(stored_id, Some(r.id.to_string()));
    let url_pttl: i64 = c.pttl(&url_key).await.expect("PTTL");
    let bound_ms = ttl_ms + binding_grace(LONG_TTL).as_millis() as i64;
    assert!(
        url_pttl > bound_ms - 5_000 && url_pttl <= bound_ms,
        "url PTTL {url_pttl}: the binding outlives the record by the grace"
    );
    let score: Option<f64> = c
        .zscore(h.all_idx(), r.id.to_string())
        .await
        .expect("ZSCORE");
    assert_eq!(score, Some(r.expires_at.as_millis() as f64));
    let score: Option<f64> = c
        .zscore(h.name_idx("A"), r.id.to_string())
        .await
        .expect("ZSCORE");
    assert_eq!(score, Some(r.expires_at.as_millis() as f64));
    let names: Vec<String> = c.smembers(h.names()).await.expect("SMEMBERS");
    assert_eq!(names, vec!["A".to_owned()]);

    // Ping refreshes both keys of the registration in one go: age them, then ping.
    wait_past(r.last_ping_at);
    const AGED_MS: i64 = 10_000;
    for key in [&svc, &url_key] {
        let set: bool = c.pexpire(key, AGED_MS, None).await.expect("PEXPIRE");
        assert!(set, "{key} exists");
    }
    let p = h.store.ping(r.id).await.expect("ping").expect("alive");
    let pinged: String = c.get(&svc).await.expect("GET");
    assert_eq!(
        pinged[26..52],
        format!(
            "{:013}{:013}",
            p.last_ping_at.as_millis(),
            p.expires_at.as_millis()
        ),
        "ping rewrites last_ping_at and expires_at in place"
    );
    assert_eq!(
        pinged[..26],
        value[..26],
        "registered_at, last_updated kept"
    );
    assert_eq!(pinged[52..], value[52..], "body untouched");
    let svc_pttl: i64 = c.pttl(&svc).await.expect("PTTL");
    assert!(
        svc_pttl > ttl_ms - 5_000 && svc_pttl <= ttl_ms,
        "record PTTL after ping {svc_pttl}"
    );
    let after: i64 = c.pttl(&url_key).await.expect("PTTL");
    assert!(
        after > bound_ms - 5_000 && after <= bound_ms,
        "url key TTL refreshed by ping ({AGED_MS} -> {after})"
    );

    // Deregistration removes every key of the registration, and leaves a tombstone that
    // binds the id to its URL: expires_at in the header width, then the URL.
    let gone = h
        .store
        .deregister(r.id)
        .await
        .expect("deregister")
        .expect("existed");
    let left: i64 = c.exists(vec![svc, url_key]).await.expect("EXISTS");
    assert_eq!(left, 0);
    let tomb = format!("{}{{{}}}:gone:{}", h.prefix, Valkey::tag(r.id), r.id);
    let tombstone: Option<String> = c.get(&tomb).await.expect("GET");
    assert_eq!(
        tombstone,
        Some(format!("{:013}{url}", gone.expires_at.as_millis()))
    );
    assert_eq!(h.zcard(&h.all_idx()).await, 0);
    assert_eq!(h.zcard(&h.name_idx("A")).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_record_encoding_survives_any_url_and_name() {
    let h = Valkey::open(LONG_TTL).await;
    let s = &h.store;
    // Colons, digits, separators, quotes and non-ASCII where the layout has lengths.
    let cases = [
        ("http://h:1/p?q=12:34|\"x\"", "7:é|☃\"{"),
        ("http://ü.example:8000/ß?a=1:2", "12:"),
        ("http://h:2", "plain"),
    ];
    let mut registered = Vec::new();
    for (url, name) in cases {
        let info = info(json!({"display_name": name, "note": "a:b|c\"d", "n": [1, 2]}));
        let r = s
            .register(Registration {
                url: url.into(),
                info: info.clone(),
                requested_id: None,
                check: None,
            })
            .await
            .expect("register");
        assert!(r.created);
        assert_eq!(
            s.get(r.record.id).await.expect("get"),
            Some(r.record.clone())
        );
        assert_eq!(
            ids(&s.list(&by_name(name)).await.expect("list")),
            vec![r.record.id]
        );
        assert_eq!(
            ids(&s.list(&by_url(url)).await.expect("list")),
            vec![r.record.id]
        );
        let p = s.ping(r.record.id).await.expect("ping").expect("alive");
        let got = s.get(r.record.id).await.expect("get").expect("alive");
        assert_eq!((got.url.as_str(), &got.info), (url, &info));
        assert_eq!(got.expires_at, p.expires_at);
        // Re-registering keeps registered_at and sees the same URL (no conflict).
        let again = s
            .register(Registration {
                url: url.into(),
                info: info.clone(),
                requested_id: None,
                check: None,
            })
            .await
            .expect("register again");
        assert!(!again.created);
        assert_eq!(again.record.id, r.record.id);
        assert_eq!(again.record.registered_at, r.record.registered_at);
        registered.push((again.record, name));
    }
    // A rename moves the entry between the by-name indexes.
    let (first, old_name) = registered[0].clone();
    let renamed = s
        .register(Registration {
            url: first.url.clone(),
            info: ServiceInfo::new("renamed"),
            requested_id: None,
            check: None,
        })
        .await
        .expect("rename")
        .record;
    assert_eq!(renamed.id, first.id);
    assert!(s.list(&by_name(old_name)).await.expect("list").is_empty());
    assert_eq!(
        ids(&s.list(&by_name("renamed")).await.expect("list")),
        vec![first.id]
    );
    for (record, _) in &registered[1..] {
        let gone = s.deregister(record.id).await.expect("deregister");
        assert_eq!(gone.map(|r| r.id), Some(record.id));
        assert!(s.list(&by_url(&record.url)).await.expect("list").is_empty());
    }
    assert_eq!(ids(&s.list(&all()).await.expect("list")), vec![first.id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_malformed_record_is_corrupt() {
    let h = Valkey::open(LONG_TTL).await;
    let s = &h.store;
    let url = "http://svc-bad:8000";
    let r = s.register(reg(url, "Bad")).await.expect("register").record;
    let svc = h.svc_key(r.id);
    let c = s.client();
    for bad in ["garbage", "1761566430000:http://svc-bad:8000"] {
        let _: () = c.set(&svc, bad, None, None, false).await.expect("SET");
        let corrupt = |what: &str, e: StoreError| {
            assert!(matches!(e, StoreError::Corrupt(_)), "{what}: {e:?}");
        };
        corrupt("get", s.get(r.id).await.expect_err("get"));
        corrupt("list", s.list(&all()).await.expect_err("list"));
        corrupt("ping", s.ping(r.id).await.expect_err("ping"));
        corrupt(
            "register",
            s.register(reg(url, "Bad")).await.expect_err("register"),
        );
        // Deregistration still removes it, and says what it found.
        corrupt(
            "deregister",
            s.deregister(r.id).await.expect_err("deregister"),
        );
        let left: i64 = c.exists(&svc).await.expect("EXISTS");
        assert_eq!(left, 0, "{bad:?} deleted");
        assert!(s.get(r.id).await.expect("get").is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_list_drops_dead_index_entries_on_read() {
    let h = Valkey::open(EXPIRY_TTL).await;
    let s = &h.store;
    let a = s
        .register(reg("http://a:8000", "A"))
        .await
        .expect("register")
        .record
        .id;
    let b = s
        .register(reg("http://b:8000", "B"))
        .await
        .expect("register")
        .record
        .id;
    assert_eq!(h.zcard(&h.all_idx()).await, 2);
    wait_gone(s, a).await;
    wait_gone(s, b).await;
    assert_eq!(
        h.zcard(&h.all_idx()).await,
        2,
        "the index still holds them before any read"
    );
    assert!(s.list(&all()).await.expect("list").is_empty());
    // The cleanup runs in the background, off the request path.
    let hr = &h;
    eventually(
        "list to drop the dead ids it read",
        Duration::from_secs(15),
        move || async move { hr.zcard(&hr.all_idx()).await == 0 },
    )
    .await;
    assert_eq!(h.zcard(&h.name_idx("A")).await, 1);
    assert!(s.list(&by_name("A")).await.expect("list").is_empty());
    eventually(
        "list by name to drop the dead id it read",
        Duration::from_secs(15),
        move || async move { hr.zcard(&hr.name_idx("A")).await == 0 },
    )
    .await;
    // The sweeper finds the remaining name index through the names set, then forgets the names.
    assert_eq!(s.sweep().await.expect("sweep"), 1);
    assert_eq!(h.zcard(&h.name_idx("B")).await, 0);
    let names: Vec<String> = s.client().smembers(h.names()).await.expect("SMEMBERS");
    assert!(names.is_empty(), "names left: {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_rejects_braces_in_the_prefix() {
    let server = tokio::task::spawn_blocking(ValkeyServer::new)
        .await
        .expect("server");
    for prefix in ["a{b:", "a}b:", "{x}"] {
        let r = ValkeyStore::connect(&server.url(), prefix, LONG_TTL).await;
        assert!(r.is_err(), "prefix {prefix:?} accepted");
    }
    assert!(ValkeyStore::connect("not a url", "p:", LONG_TTL)
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_accepts_the_valkey_scheme() {
    let server = tokio::task::spawn_blocking(ValkeyServer::new)
        .await
        .expect("server");
    let url = format!("valkey://127.0.0.1:{}", server.port());
    let store = ValkeyStore::connect(&url, "p:", LONG_TTL)
        .await
        .expect("connect");
    assert_eq!(store.health().await.expect("health").kind, "valkey");
    let r = store
        .register(reg("http://a:8000", "A"))
        .await
        .expect("register");
    assert!(store.get(r.record.id).await.expect("get").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_outage_fails_fast_and_recovers() {
    let mut server = tokio::task::spawn_blocking(ValkeyServer::new)
        .await
        .expect("server");
    let store = ValkeyStore::connect(&server.url(), "p:", LONG_TTL)
        .await
        .expect("connect");
    store.health().await.expect("healthy");

    let server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .expect("stop");
    let started = Instant::now();
    let err = store.get(Ulid::new()).await.expect_err("Valkey is down");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let err = store
        .register(reg("http://a:8000", "A"))
        .await
        .expect_err("Valkey is down");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );

    let mut server = server;
    let _server = tokio::task::spawn_blocking(move || {
        server.start();
        server
    })
    .await
    .expect("start");
    let s = &store;
    eventually(
        "the store to reconnect",
        Duration::from_secs(10),
        move || async move { s.health().await.is_ok() },
    )
    .await;
    let r = store
        .register(reg("http://a:8000", "A"))
        .await
        .expect("register after outage");
    assert!(r.created, "the restarted server is empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_connect_before_the_server_is_up() {
    let mut server = tokio::task::spawn_blocking(ValkeyServer::new)
        .await
        .expect("server");
    let url = server.url();
    let mut server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .expect("stop");
    let started = Instant::now();
    let store = ValkeyStore::connect(&url, "p:", LONG_TTL)
        .await
        .expect("connect returns while Valkey is down");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert!(store.health().await.is_err(), "nothing to talk to yet");

    let _server = tokio::task::spawn_blocking(move || {
        server.start();
        server
    })
    .await
    .expect("start");
    let s = &store;
    eventually(
        "the store to connect",
        Duration::from_secs(10),
        move || async move { s.health().await.is_ok() },
    )
    .await;
    assert!(
        store
            .register(reg("http://a:8000", "A"))
            .await
            .expect("register")
            .created
    );
}

// ---------------------------------------------------------------------------------------------
// Valkey only: index consistency under races and stalls, hung connections.

/// Panics unless a live `id` is listed by `list(all)` and by its display name.
async fn assert_listed_if_live(s: &ValkeyStore, id: Ulid, what: &str) {
    let Some(record) = s.get(id).await.expect("get") else {
        return;
    };
    let listed = ids(&s.list(&all()).await.expect("list"));
    assert!(
        listed.contains(&id),
        "{what}: live {id} missing from list(all)"
    );
    let name = &record.info.display_name;
    let listed = ids(&s.list(&by_name(name)).await.expect("list"));
    assert!(
        listed.contains(&id),
        "{what}: live {id} missing from list(display_name={name})"
    );
}

/// A second store (its own client and connection) on the same server and prefix: another
/// orchestrator.
async fn second_store(h: &Valkey, url: &str, ttl: Duration) -> ValkeyStore {
    ValkeyStore::connect(url, &h.prefix, ttl)
        .await
        .expect("connect the second store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn valkey_deregister_racing_a_reregistration_keeps_it_indexed() {
    let server = tokio::task::spawn_blocking(ValkeyServer::new)
        .await
        .expect("server");
    let prefix = format!("test:{}:", Ulid::new());
    let a = ValkeyStore::connect(&server.url(), &prefix, LONG_TTL)
        .await
        .expect("connect");
    let h = Valkey {
        store: a.clone(),
        prefix,
        _server: server,
    };
    let b = second_store(&h, &h._server.url(), LONG_TTL).await;
    let url = "http://flapping:8000";
    for round in 0..300 {
        let id = a.register(reg(url, "A")).await.expect("register").record.id;
        // Half the rounds also move it to another display name.
        let name = if round % 2 == 0 { "A" } else { "B" };
        let (gone, again) = tokio::join!(a.deregister(id), b.register(with_id(reg(url, name), id)));
        gone.expect("deregister");
        again.expect("re-register");
        assert_listed_if_live(&a, id, &format!("round {round}")).await;
    }
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn valkey_concurrent_renames_keep_the_entry_indexed() {
    let h = Valkey::open(LONG_TTL).await;
    let a = h.store.clone();
    let b = second_store(&h, &h._server.url(), LONG_TTL).await;
    let url = "http://renamed:8000";
    let id = a.register(reg(url, "A")).await.expect("register").record.id;
    for round in 0..200 {
        let (x, y) = tokio::join!(a.register(reg(url, "A")), b.register(reg(url, "B")));
        assert_eq!(x.expect("register A").record.id, id);
        assert_eq!(y.expect("register B").record.id, id);
        assert_listed_if_live(&a, id, &format!("round {round}")).await;
    }
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn valkey_register_cut_short_by_a_stall_is_still_listed() {
    let h = Valkey::open(LONG_TTL).await;
    // Registrations in flight at staggered times while writes are paused for longer than
    // the command timeout: some time out before, some during, some after their record
    // script. A paused command still runs once the pause ends. The pause outlasts the
    // command timeout by far (the test lifts it itself), and the last few registrations
    // start only once it is on, so some are cut short however slowly this test runs.
    let register = |i: u64| {
        let store = h.store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(i * 5)).await;
            store
                .register(reg(&format!("http://stalled-{i}:8000"), "S"))
                .await
        })
    };
    let mut tasks: Vec<_> = (0..35).map(register).collect();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let reply = h._server.command(&["CLIENT", "PAUSE", "20000", "WRITE"]);
    assert_eq!(reply, "+OK");
    tasks.extend((35..40).map(register));
    let mut failed = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => {}
            Err(StoreError::Unavailable(_)) => failed += 1,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert!(failed > 0, "the pause cut no registration short");
    // Lift the pause and look. Valkey runs the commands it held before it answers UNPAUSE,
    // and a live record is listed at every instant anyway, so nothing needs to settle.
    assert_eq!(h._server.command(&["CLIENT", "UNPAUSE"]), "+OK");
    let s = &h.store;
    eventually(
        "the store to answer again",
        Duration::from_secs(10),
        move || async move { s.health().await.is_ok() },
    )
    .await;
    for i in 0..40 {
        let url = format!("http://stalled-{i}:8000");
        for r in h.store.list(&by_url(&url)).await.expect("list by URL") {
            assert_listed_if_live(&h.store, r.id, &url).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_hung_connection_is_replaced() {
    let server = tokio::task::spawn_blocking(ValkeyServer::new)
        .await
        .expect("server");
    let store = ValkeyStore::connect(&server.url(), "p:", LONG_TTL)
        .await
        .expect("connect");
    let client_id = |store: ValkeyStore| async move {
        let cmd = fred::types::CustomCommand::new_static(
            "CLIENT",
            fred::types::ClusterHash::FirstKey,
            false,
        );
        let id: i64 = store
            .client()
            .custom(cmd, vec!["ID"])
            .await
            .expect("CLIENT ID");
        id
    };
    let before = client_id(store.clone()).await;

    let mut server = server;
    server.pause();
    // Steady traffic to a frozen server: every call fails within the command bound.
    for _ in 0..4 {
        let started = Instant::now();
        let err = store.get(Ulid::new()).await.expect_err("Valkey is frozen");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "took {:?}",
            started.elapsed()
        );
    }
    server.resume();
    let s = &store;
    eventually(
        "the store to work again",
        Duration::from_secs(15),
        move || async move { s.get(Ulid::new()).await.is_ok() },
    )
    .await;
    let r = store
        .register(reg("http://a:8000", "A"))
        .await
        .expect("register after the freeze");
    assert!(store.get(r.record.id).await.expect("get").is_some());
    assert_ne!(
        client_id(store.clone()).await,
        before,
        "the hung connection was replaced by a new one"
    );
}

// ---------------------------------------------------------------------------------------------
// Health (issue 13)

fn health(status: HealthStatus, output: &str) -> Health {
    Health {
        status,
        output: output.to_owned(),
        checked_at: Some(Timestamp::now()),
    }
}

/// Every record of one listing of `filter`, by id.
async fn listed<S: Store>(s: &S, filter: &ListFilter) -> Vec<ServiceRecord> {
    let mut records = s.list(filter).await.expect("list");
    records.sort_by_key(|r| r.id);
    records
}

/// The changes after `after`, without waiting.
async fn changes_after<S: Store>(s: &S, after: Cursor) -> Vec<(ChangeKind, Option<ServiceRecord>)> {
    match s
        .changes(after, 100, Duration::ZERO)
        .await
        .expect("changes")
    {
        Changes::Changes(v) => v
            .into_iter()
            .map(|c| {
                let record = match c.subject {
                    Subject::Record(r) => Some((*r).clone()),
                    Subject::Known { .. } => None,
                };
                (c.kind, record)
            })
            .collect(),
        Changes::Gap => panic!("a gap in a fresh log"),
    }
}

fn with_check(mut r: Registration, check: Option<CheckSpec>) -> Registration {
    r.check = check;
    r
}

async fn set_health_sets_and_persists<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let url = "http://healthy:8000";
    let r = s.register(reg(url, "H")).await.expect("register");
    assert_eq!(r.record.health, Health::default(), "a new entry is passing");
    let id = r.record.id;
    let sick = health(HealthStatus::Critical, "db: down {12:34}");
    let set = s
        .set_health(id, sick.clone(), Access::default())
        .await
        .expect("set_health")
        .expect("live");
    assert!(set.changed);
    assert_eq!(set.record.health, sick);
    assert_eq!(
        ServiceRecord {
            health: Health::default(),
            ..set.record.clone()
        },
        r.record,
        "only the health changed (the TTL too is kept)"
    );
    assert_eq!(s.get(id).await.expect("get").expect("live").health, sick);
    assert_eq!(listed(s, &all()).await, vec![set.record.clone()]);
    assert_eq!(listed(s, &by_name("H")).await, vec![set.record.clone()]);

    // A ping renews the entry, not its health.
    s.ping(id).await.expect("ping").expect("live");
    assert_eq!(s.get(id).await.expect("get").expect("live").health, sick);

    // A re-registration keeps it too, and answers it.
    let again = s.register(reg(url, "H2")).await.expect("re-register");
    assert!(!again.created);
    assert_eq!(again.record.health, sick);
    assert_eq!(s.get(id).await.expect("get").expect("live"), again.record);

    // Back to the default health: the record is as if nothing ever reported.
    let set = s
        .set_health(id, Health::default(), Access::default())
        .await
        .expect("set_health")
        .expect("live");
    assert!(set.changed);
    assert_eq!(
        s.get(id).await.expect("get").expect("live").health,
        Health::default()
    );
}

async fn a_status_change_logs_one_updated<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let id = s
        .register(reg("http://logged:8000", "L"))
        .await
        .expect("register")
        .record
        .id;
    let head = s.change_head().await.expect("head");
    let sick = health(HealthStatus::Critical, "first");
    let set = |health: Health| async move {
        s.set_health(id, health, Access::default())
            .await
            .expect("set_health")
            .expect("live")
    };
    assert!(set(sick.clone()).await.changed);
    // Same status, other output: written, not logged.
    let quieter = health(HealthStatus::Critical, "second");
    let same = set(quieter.clone()).await;
    assert!(!same.changed);
    assert_eq!(same.record.health, quieter);
    assert_eq!(s.get(id).await.expect("get").expect("live").health, quieter);
    // The same status and output again, later: nothing to write, `checked_at` stays.
    let later = Health {
        checked_at: quieter
            .checked_at
            .map(|t| Timestamp::from_millis(t.as_millis() + 1000)),
        ..quieter.clone()
    };
    let same = set(later).await;
    assert!(!same.changed);
    assert_eq!(same.record.health, quieter);
    assert_eq!(s.get(id).await.expect("get").expect("live").health, quieter);
    let logged = changes_after(s, head).await;
    assert_eq!(logged.len(), 1, "{logged:?}");
    let (kind, record) = &logged[0];
    assert_eq!(*kind, ChangeKind::Updated);
    let record = record.as_ref().expect("the record");
    assert_eq!((record.id, &record.health), (id, &sick));

    // Another status: one more.
    let head = s.change_head().await.expect("head");
    let warning = health(HealthStatus::Warning, "slow");
    assert!(set(warning.clone()).await.changed);
    let logged = changes_after(s, head).await;
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0].0, ChangeKind::Updated);
    assert_eq!(logged[0].1.as_ref().map(|r| &r.health), Some(&warning));
}

async fn set_health_of_an_unknown_id_is_none<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let sick = health(HealthStatus::Critical, "x");
    for access in [Access::default(), ADMIN] {
        assert!(s
            .set_health(mint_id("http://nobody:1"), sick.clone(), access)
            .await
            .expect("set_health")
            .is_none());
    }
    // A deregistered one too.
    let id = s
        .register(reg("http://gone:8000", "G"))
        .await
        .expect("register")
        .record
        .id;
    s.deregister(id)
        .await
        .expect("deregister")
        .expect("was live");
    let head = s.change_head().await.expect("head");
    assert!(s
        .set_health(id, sick, Access::default())
        .await
        .expect("set_health")
        .is_none());
    assert!(s.get(id).await.expect("get").is_none(), "not resurrected");
    assert!(changes_after(s, head).await.is_empty());
}

async fn set_health_of_an_expired_id_is_none<H: Harness>() {
    let h = H::open(EXPIRY_TTL).await;
    let s = h.store();
    let (registered, span) = timed(s.register(reg("http://expiring:8000", "E"))).await;
    let id = registered.expect("register").record.id;
    // Nothing reads the entry before: a store that drops expired entries only when read
    // must still refuse it here.
    tokio::time::sleep_until(span.surely_expired(s.ttl())).await;
    assert!(s
        .set_health(id, health(HealthStatus::Critical, "x"), ADMIN)
        .await
        .expect("set_health")
        .is_none());
    assert!(s.get(id).await.expect("get").is_none(), "not resurrected");
}

async fn a_lease_guards_set_health<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let r = s
        .register_as(
            reg("http://leased-health:8000", "L"),
            Access::default(),
            Some(lease("one")),
        )
        .await
        .expect("register leased");
    let id = r.record.id;
    let sick = health(HealthStatus::Critical, "x");
    for access in [Access::default(), holding("wrong")] {
        forbidden("set_health", s.set_health(id, sick.clone(), access).await);
    }
    assert_eq!(
        s.get(id).await.expect("get").expect("live"),
        r.record,
        "untouched"
    );
    for (access, status) in [
        (holding("one"), HealthStatus::Critical),
        (ADMIN, HealthStatus::Warning),
    ] {
        let set = s
            .set_health(id, health(status, "y"), access)
            .await
            .expect("set_health")
            .expect("live");
        assert_eq!(set.record.health.status, status);
    }
    // The lease is still there, still guarding.
    forbidden("ping", s.ping(id).await);
}

async fn lists_filter_by_health<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let mut made = Vec::new();
    for (i, name) in ["A", "A", "B"].iter().enumerate() {
        let url = format!("http://by-health-{i}:8000");
        made.push(
            s.register(reg(&url, name))
                .await
                .expect("register")
                .record
                .id,
        );
    }
    for (id, status) in [
        (made[1], HealthStatus::Critical),
        (made[2], HealthStatus::Warning),
    ] {
        s.set_health(id, health(status, ""), ADMIN)
            .await
            .expect("set_health")
            .expect("live");
    }
    let by_health = |statuses: &[HealthStatus], name: Option<&str>| ListFilter {
        health: statuses.to_vec(),
        display_name: name.map(str::to_owned),
        ..ListFilter::default()
    };
    use HealthStatus::{Critical, Passing, Warning};
    let cases: [(ListFilter, Vec<Ulid>); 6] = [
        (by_health(&[], None), made.clone()),
        (by_health(&[Passing], None), vec![made[0]]),
        (by_health(&[Passing, Warning], None), vec![made[0], made[2]]),
        (by_health(&[Critical], None), vec![made[1]]),
        (
            by_health(&[Passing, Critical], Some("A")),
            vec![made[0], made[1]],
        ),
        (by_health(&[Warning], Some("A")), vec![]),
    ];
    for (filter, want) in cases {
        assert_eq!(
            sorted(ids(&listed(s, &filter).await)),
            sorted(want.clone()),
            "{filter:?}"
        );
        assert_eq!(
            sorted(walk(s, &filter, 1).await),
            sorted(want),
            "{filter:?} by pages"
        );
    }
}

async fn a_check_round_trips_and_is_replaced<H: Harness>() {
    // The health a check found belongs to that check: a re-registration keeps the health only
    // with the same check (or, for pushed health, with none before and after).
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let url = "http://checked:8000";
    let http = CheckSpec::http("/health")
        .interval(Duration::from_secs(3))
        .deregister_critical_after(Duration::from_secs(30));
    let r = s
        .register(with_check(reg(url, "C"), Some(http.clone())))
        .await
        .expect("register");
    let id = r.record.id;
    assert_eq!(r.record.check.as_ref(), Some(&http));
    assert_eq!(
        s.get(id).await.expect("get").expect("live").check,
        Some(http.clone())
    );
    assert_eq!(listed(s, &all()).await[0].check, Some(http.clone()));
    let sick = health(HealthStatus::Critical, "x");
    let set = s
        .set_health(id, sick.clone(), ADMIN)
        .await
        .expect("set_health")
        .expect("live");
    assert_eq!(
        set.record.check,
        Some(http.clone()),
        "set_health keeps the check"
    );

    // The same check again: the health stays.
    let r = s
        .register(with_check(reg(url, "C"), Some(http)))
        .await
        .expect("re-register");
    assert_eq!(r.record.health, sick);
    // Another check replaces it and starts from passing.
    let r = s
        .register(with_check(reg(url, "C"), Some(CheckSpec::tcp())))
        .await
        .expect("re-register");
    assert_eq!(
        (r.record.check.clone(), &r.record.health),
        (Some(CheckSpec::tcp()), &Health::default())
    );
    assert_eq!(s.get(id).await.expect("get").expect("live"), r.record);
    // One without a check removes it, and the health it found.
    s.set_health(id, sick.clone(), ADMIN)
        .await
        .expect("set_health")
        .expect("live");
    let r = s.register(reg(url, "C")).await.expect("re-register");
    assert_eq!(
        (r.record.check.clone(), &r.record.health),
        (None, &Health::default())
    );
    assert_eq!(s.get(id).await.expect("get").expect("live"), r.record);
    assert_eq!(listed(s, &all()).await, vec![r.record.clone()]);
    // Without a check before and after (pushed health), the health stays.
    s.set_health(id, sick.clone(), ADMIN)
        .await
        .expect("set_health")
        .expect("live");
    let r = s.register(reg(url, "C")).await.expect("re-register");
    assert_eq!(r.record.health, sick);
}

async fn checkers_lists_every_live_replica<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let ttl = Duration::from_secs(60);
    assert_eq!(
        s.checkers("replica-b", ttl).await.expect("checkers"),
        ["replica-b"]
    );
    assert_eq!(
        s.checkers("replica-a", ttl).await.expect("checkers"),
        ["replica-a", "replica-b"]
    );
    assert_eq!(
        s.checkers("replica-b", ttl).await.expect("checkers"),
        ["replica-a", "replica-b"],
        "announcing again adds no second entry"
    );
    for (replica, ttl) in [
        ("", ttl),
        ("bad\nid", ttl),
        (&*"x".repeat(300), ttl),
        ("replica-c", Duration::ZERO),
        ("replica-c", Duration::from_secs(400 * 24 * 3600)),
    ] {
        let r = s.checkers(replica, ttl).await;
        assert!(
            matches!(r, Err(StoreError::Config(_))),
            "{replica:?} {ttl:?}: {r:?}"
        );
    }
    assert_eq!(
        s.checkers("replica-a", ttl).await.expect("checkers"),
        ["replica-a", "replica-b"],
        "refused announcements are not listed"
    );
}

async fn a_silent_checker_is_gone_after_its_ttl<H: Harness>() {
    let h = H::open(LONG_TTL).await;
    let s = h.store();
    let long = Duration::from_secs(60);
    let short = Duration::from_secs(1);
    let (announced, span) = timed(s.checkers("silent", short)).await;
    assert_eq!(announced.expect("checkers"), ["silent"]);
    let (both, later) = timed(s.checkers("steady", long)).await;
    if span.keeps_alive(short, later) {
        assert_eq!(both.expect("checkers"), ["silent", "steady"]);
    }
    eventually(
        "the silent checker to drop out",
        short + Duration::from_secs(10),
        || async { s.checkers("steady", long).await.expect("checkers") == ["steady"] },
    )
    .await;
    let gone_at = Instant::now();
    assert!(
        gone_at >= span.start + short,
        "dropped before its ttl: {:?} after announcing",
        gone_at - span.start
    );
}
