//! The shared store: registrations in Valkey (or Redis), with real TTL expiry, so several
//! stateless orchestrators can share one registry (standalone or Cluster).
//!
//! Why it looks the way it does (the key layout, the record layout, the index consistency
//! rules, what is atomic and how connections behave) is in `docs/valkey-store.md`.

mod connection;
mod index;
mod keys;
mod list;
mod log;
mod record;
mod scripts;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::clients::Client;
use fred::error::Error as FredError;
use fred::interfaces::{ClientLike, KeysInterface, SetsInterface, SortedSetsInterface};
use fred::types::{Expiration, Value};
use servicekit::protocol::{Health, ServiceRecord, Timestamp};
use ulid::Ulid;

pub use connection::{COMMAND_TIMEOUT, TIMEOUTS_BEFORE_RECONNECT};
pub use keys::tag_text;
pub use list::ValkeyListing;

use connection::ConnState;
use index::{DropMode, BATCH};
use keys::Keys;
use record::{
    check_field, health_field, health_from_field, record_from_value, record_head, RawRecord,
    MAX_TTL,
};
use scripts::{CHECKERS, DEREGISTER, HEALTH, HEALTH_LOGGED, PING, REGISTER};

use super::{
    checker_replica_ok, id_fits_url, mint_id, Access, HealthSet, LeaseHash, LeaseOutcome,
    ListFilter, Pinged, Registered, Registration, Store, StoreError, StoreHealth, CHANGE_LOG_LEN,
};

/// Lifetime of the health check's test key.
const HEALTH_KEY_TTL_MS: i64 = 5_000;
/// How often register re-reads the URL key when it loses a race.
const REGISTER_ATTEMPTS: usize = 8;

/// Registrations in Valkey. Cheap to clone: clones share one client and its connections.
#[derive(Clone)]
pub struct ValkeyStore {
    client: Client,
    keys: Keys,
    ttl: Duration,
    /// How long a URL stays bound to its id after its entry expired or was deregistered.
    grace: Duration,
    conn: Arc<ConnState>,
    /// This orchestrator's health-check key (see [`Keys::health`]).
    health_key: Arc<str>,
    /// How many entries the change log keeps (`MAXLEN ~`).
    log_len: usize,
    /// The connection for the change log's blocking reads, opened on first use.
    blocker: Arc<tokio::sync::OnceCell<Client>>,
}

impl std::fmt::Debug for ValkeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValkeyStore")
            .field("prefix", &self.keys.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl ValkeyStore {
    /// The one command a ping sends: the Lua script, its keys and its arguments. Public so
    /// the load benchmark can drive Valkey with exactly this command, without HTTP, and
    /// compare (see BENCHMARKS.md).
    pub fn ping_command(&self, id: Ulid) -> (&'static str, Vec<String>, Vec<String>) {
        self.ping_command_as(id, Access::default())
    }

    fn ping_command_as(
        &self,
        id: Ulid,
        access: Access,
    ) -> (&'static str, Vec<String>, Vec<String>) {
        let [token, admin] = access_args(access);
        (
            PING.lua(),
            vec![self.keys.svc(id)],
            vec![
                self.keys.url_prefix_of(id),
                id.to_string(),
                self.ttl_ms().to_string(),
                token,
                admin,
                self.url_key_ms().to_string(),
            ],
        )
    }

    /// Connects to `url` (`redis://`, `valkey://`, `redis-cluster://`, `valkey-cluster://` ...)
    /// and keys everything under `prefix`. See `docs/valkey-store.md` for the connection
    /// behaviour.
    pub async fn connect(
        url: &str,
        prefix: &str,
        ttl: Duration,
    ) -> Result<ValkeyStore, StoreError> {
        if prefix.contains(['{', '}']) {
            return Err(StoreError::Config(format!(
                "invalid Valkey key prefix {prefix:?}: it may not contain '{{' or '}}'"
            )));
        }
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(StoreError::Config(format!(
                "the TTL must be positive and at most {} days",
                MAX_TTL.as_secs() / 86_400
            )));
        }
        let (client, conn) = connection::open(url).await?;
        let keys = Keys {
            prefix: Arc::from(prefix),
        };
        Ok(ValkeyStore {
            client,
            health_key: Arc::from(keys.health(Ulid::new())),
            keys,
            ttl,
            grace: super::binding_grace(ttl),
            conn,
            log_len: CHANGE_LOG_LEN,
            blocker: Arc::new(tokio::sync::OnceCell::new()),
        })
    }

    /// The same store with a change log of about `len` entries (at least 1) instead of
    /// [`CHANGE_LOG_LEN`]. For tests: a short log shows gaps quickly. Valkey trims it
    /// approximately (whole stream nodes of 100 entries), so it may hold somewhat more.
    pub fn with_change_log_len(mut self, len: usize) -> Self {
        self.log_len = len.max(1);
        self
    }

    /// The same store with another binding grace (at least the TTL): how long a URL stays
    /// bound to its id after the entry expired or was deregistered. For tests.
    pub fn with_binding_grace(mut self, grace: Duration) -> Self {
        self.grace = grace.max(self.ttl);
        self
    }

    /// The underlying client (tests inspect keys with it).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.keys.prefix
    }

    /// Closes the connections; clones of this store stop working too.
    pub async fn close(&self) {
        if let Some(blocker) = self.blocker.get() {
            let _ = blocker.quit().await;
        }
        let _ = self.client.quit().await;
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// How long a URL key lives after its last refresh: the grace past its record, so the
    /// URL's binding to its id outlives an expiry (see the store module docs).
    fn url_key_ms(&self) -> u64 {
        self.ttl_ms().saturating_add(self.grace_ms())
    }

    /// The binding grace, also the tombstone's life (at least the TTL, which the index
    /// rules need).
    fn grace_ms(&self) -> u64 {
        u64::try_from(self.grace.as_millis())
            .unwrap_or(u64::MAX)
            .max(self.ttl_ms())
    }

    /// Whether the live record of `id` (if any) would let `access` write it, read ahead of
    /// the script that decides atomically: a register that is going to be refused adds no
    /// index hint.
    async fn may_write(&self, id: Ulid, access: Access) -> Result<bool, StoreError> {
        let reply: Value = self.note(self.client.get(self.keys.svc(id)).await)?;
        let Some(bytes) = reply.as_bytes() else {
            return Ok(true);
        };
        let held = RawRecord::parse(bytes)
            .ok()
            .and_then(|raw| raw.lease.and_then(LeaseHash::from_hex));
        Ok(LeaseOutcome::decide(held.as_ref(), access, None).is_ok())
    }
}

/// The script arguments of an [`Access`]: the presented lease hash ('' for none) and the
/// admin flag.
fn access_args(access: Access) -> [String; 2] {
    [
        access.token.map(|h| h.hex()).unwrap_or_default(),
        if access.admin { "1" } else { "0" }.to_owned(),
    ]
}

impl ValkeyStore {
    /// [`Store::register_as`]'s steps, run to completion by [`to_completion`].
    async fn register_steps(
        &self,
        reg: Registration,
        access: Access,
        new_lease: Option<LeaseHash>,
    ) -> Result<Registered, StoreError> {
        let info_json = serde_json::to_string(&reg.info)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode info: {e}")))?;
        let name = reg.info.display_name.clone();
        let head = record_head(&reg.url, &name);
        let check = check_field(reg.check.as_ref())?;
        let url_key = self.keys.url(&reg.url);
        let [token, admin] = access_args(access);
        let new_lease_hex = new_lease.map(|h| h.hex()).unwrap_or_default();
        let mut rejected: Vec<Ulid> = Vec::new();
        for _ in 0..REGISTER_ATTEMPTS {
            let current: Option<String> = self.note(self.client.get(&url_key).await)?;
            let current_id = current
                .as_deref()
                .and_then(|s| Ulid::from_string(s).ok())
                .filter(|id| id_fits_url(*id, &reg.url) && !rejected.contains(id));
            // A proposed id counts only where the URL key names none; the script keeps it
            // only when its tombstone names this URL.
            let requested = reg
                .requested_id
                .filter(|id| id_fits_url(*id, &reg.url) && !rejected.contains(id));
            let claimed = current_id.is_none() && requested.is_some();
            let chosen = current_id.or(requested);
            let id = chosen.unwrap_or_else(|| mint_id(&reg.url));
            if let Some(current) = current_id {
                if !self.may_write(current, access).await? {
                    return Err(StoreError::Forbidden);
                }
            }
            // Index first, so the record is listed even if a later step fails.
            let hint = self.hint_score();
            self.index_at(id, &name, hint).await?;
            let reply = self.note(
                REGISTER
                    .run(
                        &self.client,
                        vec![url_key.clone(), self.keys.svc(id), self.keys.gone(id)],
                        vec![
                            current.clone().unwrap_or_default(),
                            id.to_string(),
                            reg.url.clone(),
                            head.clone(),
                            self.ttl_ms().to_string(),
                            info_json.clone(),
                            if claimed { "1" } else { "0" }.to_owned(),
                            token.clone(),
                            new_lease_hex.clone(),
                            admin.clone(),
                            self.url_key_ms().to_string(),
                            check.clone(),
                        ],
                    )
                    .await,
            )?;
            let items = array_of(reply, "register")?;
            let status = items.first().and_then(Value::as_string).unwrap_or_default();
            match status.as_str() {
                "retry" | "conflict" | "unbound" => {
                    if status != "retry" {
                        rejected.push(id);
                    }
                    // Nobody else knows an id minted here, so its hint can go at once. Hints
                    // on other ids may be someone else's entry: the sweeper handles those.
                    if chosen.is_none() {
                        self.unindex(id, &name, hint).await;
                    }
                    continue;
                }
                "created" | "updated" => {}
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "register script answered {other:?}"
                    )))
                }
            }
            if items.len() < 4 {
                return Err(StoreError::Corrupt(format!("register answered {items:?}")));
            }
            let registered_at = ms_of(&items[1], "registered_at")?;
            let now = ms_of(&items[2], "last_updated")?;
            let expires_at = ms_of(&items[3], "expires_at")?;
            let old_name = items.get(4).and_then(Value::as_string);
            let old_expires = items.get(5).and_then(Value::as_string);
            let lease = match items.get(6).and_then(Value::as_string).as_deref() {
                Some("none") => LeaseOutcome::None,
                Some("new") => LeaseOutcome::New,
                Some("kept") => LeaseOutcome::Kept,
                Some("held") => LeaseOutcome::Held,
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "register answered lease {other:?}"
                    )))
                }
            };
            // A live entry keeps its health; a new one starts with the default.
            let health = match items.get(7).and_then(Value::as_bytes) {
                Some(field) => health_from_field(field).map_err(|e| {
                    StoreError::Corrupt(format!("register of {id} answered health: {e}"))
                })?,
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "register answered no health: {items:?}"
                    )))
                }
            };
            let previous = match (old_name, old_expires) {
                (Some(old), Some(expires)) if old != name => Some((old, expires)),
                _ => None,
            };
            let record = ServiceRecord {
                id,
                url: reg.url,
                info: reg.info,
                registered_at,
                last_updated: now,
                last_ping_at: now,
                expires_at,
                health,
                check: reg.check,
            };
            // The change log's entry, with the index update (both raise the all-index score
            // with ZADD GT, so their order does not matter). A failed announcement fails the
            // register: its outcome is unknown to the caller anyway, and the retry announces.
            // Boxed: fred's command futures are large, and two side by side made this
            // future (and every frame that moves it) overflow a worker's stack in debug builds.
            let ((), announced) = tokio::join!(
                Box::pin(self.index_version(id, &name, expires_at, previous)),
                Box::pin(self.announce(&record))
            );
            announced?;
            return Ok(Registered {
                record,
                created: status == "created",
                lease,
            });
        }
        Err(StoreError::Unavailable(format!(
            "registration of {} kept racing with others; try again",
            reg.url
        )))
    }

    /// [`Store::set_health`]'s steps, run to completion by [`to_completion`]: the record
    /// script, then (for a new status) the change log's entry, like a re-registration's.
    async fn set_health_steps(
        &self,
        id: Ulid,
        health: Health,
        access: Access,
    ) -> Result<Option<HealthSet>, StoreError> {
        let [token, admin] = access_args(access);
        let reply = self.note(
            HEALTH
                .run(
                    &self.client,
                    vec![self.keys.svc(id)],
                    vec![health_field(&health), token, admin],
                )
                .await,
        )?;
        if reply.is_null() {
            return Ok(None);
        }
        let (value, changed, written) = match array_of(reply, "set_health")?.as_slice() {
            [value, Value::Integer(changed), written] => {
                (value.clone(), *changed != 0, written.as_string())
            }
            other => {
                return Err(StoreError::Corrupt(format!(
                    "set_health answered {other:?}"
                )))
            }
        };
        let record = record_from_value(id, &value)?
            .ok_or_else(|| StoreError::Corrupt(format!("set_health of {id} answered no record")))?;
        if changed {
            // As for a register, a failed log entry fails the call. The record's new health
            // stays pending until the entry is logged, so the next report of any status logs
            // it (docs/valkey-store.md).
            self.announce_change(&record).await?;
            if let Some(pending) = written.filter(|w| !w.is_empty()) {
                // Unmarked, the next report of the same status logs a second `updated`:
                // harmless (watchers apply it as an upsert), so a failure here is no error.
                let marked = HEALTH_LOGGED
                    .run(&self.client, vec![self.keys.svc(id)], vec![pending])
                    .await;
                if let Err(e) = self.note(marked.map(|_: Value| ())) {
                    tracing::debug!(%id, error = %e, "set_health: not marked logged");
                }
            }
        }
        Ok(Some(HealthSet { record, changed }))
    }

    /// [`Store::deregister_as`]'s steps, run to completion by [`to_completion`].
    async fn deregister_steps(
        &self,
        id: Ulid,
        access: Access,
    ) -> Result<Option<ServiceRecord>, StoreError> {
        let [token, admin] = access_args(access);
        let reply = self.note(
            DEREGISTER
                .run(
                    &self.client,
                    vec![self.keys.svc(id), self.keys.gone(id)],
                    vec![
                        self.keys.url_prefix_of(id),
                        id.to_string(),
                        self.grace_ms().to_string(),
                        token,
                        admin,
                    ],
                )
                .await,
        )?;
        if reply.is_null() {
            return Ok(None);
        }
        let bytes = reply
            .as_bytes()
            .ok_or_else(|| StoreError::Corrupt(format!("deregister of {id} answered {reply:?}")))?;
        // A malformed record is gone now too; the sweeper drops its index entries.
        let raw = RawRecord::parse(bytes)
            .map_err(|e| StoreError::Corrupt(format!("record {id}: {e}")))?;
        // Only this version's entries: a re-registration racing with us scored higher. The
        // all-index entry goes in the script that logs the deregistration (log.rs).
        let by_name = self.keys.name_idx(raw.name);
        let entry = [id.to_string(), raw.expires_at.to_string()];
        let dropped = async {
            if let Err(e) = self.drop_entries(&by_name, &entry, DropMode::AtMost).await {
                tracing::debug!(error = %e, %id, "index cleanup failed; the sweeper will finish it");
            }
        };
        let record = match raw.into_record(id) {
            Ok(record) => record,
            Err(e) => {
                dropped.await;
                return Err(e);
            }
        };
        let ((), logged) = tokio::join!(dropped, Box::pin(self.log_deregistered(&record)));
        // Best effort: the record is gone; if this failed, its all-index entry stays and the
        // reaper logs the removal (as `expired`) once its score has passed.
        if let Err(e) = logged {
            tracing::debug!(error = %e, %id, "logging a deregistration failed; the reaper will");
        }
        Ok(Some(record))
    }
}

/// Runs a store operation of several steps as a task of its own, so that a caller who stops
/// waiting (a timeout, a closed connection) cannot stop it half way, between its record script
/// and its index update (docs/valkey-store.md, "Index consistency").
async fn to_completion<T: Send + 'static>(
    op: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::spawn(op).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(StoreError::Unavailable(format!("store task ended: {e}"))),
    }
}

fn ms_of(v: &Value, what: &str) -> Result<Timestamp, StoreError> {
    let text = v
        .as_string()
        .ok_or_else(|| StoreError::Corrupt(format!("{what}: expected a number, got {v:?}")))?;
    text.parse::<u64>()
        .map(Timestamp::from_millis)
        .map_err(|_| StoreError::Corrupt(format!("{what}: not a millisecond count: {text:?}")))
}

/// The elements of a script's array reply.
fn array_of(v: Value, what: &str) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(StoreError::Corrupt(format!(
            "{what}: expected an array, got {other:?}"
        ))),
    }
}

impl Store for ValkeyStore {
    type Listing = ValkeyListing;

    fn kind(&self) -> &'static str {
        "valkey"
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn register_as(
        &self,
        reg: Registration,
        access: Access,
        new_lease: Option<LeaseHash>,
    ) -> Result<Registered, StoreError> {
        let store = self.clone();
        // Boxed: the steps' state is large, and a caller's future would otherwise carry it
        // (debug builds overflowed a worker's stack copying it around).
        to_completion(Box::pin(async move {
            store.register_steps(reg, access, new_lease).await
        }))
        .await
    }

    async fn ping_as(&self, id: Ulid, access: Access) -> Result<Option<Pinged>, StoreError> {
        let (_, keys, args) = self.ping_command_as(id, access);
        let reply = self.note(PING.run(&self.client, keys, args).await)?;
        if reply.is_null() {
            return Ok(None);
        }
        let items = array_of(reply, "ping")?;
        let (pinged, repair) = match items.as_slice() {
            [last, expires, rest @ ..] if rest.len() <= 1 => (
                Pinged {
                    id,
                    last_ping_at: ms_of(last, "last_ping_at")?,
                    expires_at: ms_of(expires, "expires_at")?,
                },
                rest.first().and_then(Value::as_string),
            ),
            other => return Err(StoreError::Corrupt(format!("ping answered {other:?}"))),
        };
        // The script asks for it once per TTL period: re-add the id where it belongs, in case
        // an index write was lost (docs/valkey-store.md, "Index consistency"). Off the
        // request's path: the ping's answer does not depend on it.
        if let Some(name) = repair {
            let (store, expires_at) = (self.clone(), pinged.expires_at.as_millis());
            tokio::spawn(async move {
                // Same round trip: whether the change log announced the id. A register that
                // died between its record and its announcement is announced here, within a TTL.
                match store.index_checking(id, &name, expires_at, true).await {
                    Ok(true) => {}
                    Ok(false) => store.announce_live(id).await,
                    Err(e) => tracing::debug!(error = %e, %id, "index repair on ping failed"),
                }
            });
        }
        Ok(Some(pinged))
    }

    async fn set_health(
        &self,
        id: Ulid,
        health: Health,
        access: Access,
    ) -> Result<Option<HealthSet>, StoreError> {
        let store = self.clone();
        to_completion(Box::pin(async move {
            store.set_health_steps(id, health, access).await
        }))
        .await
    }

    async fn checkers(&self, replica: &str, ttl: Duration) -> Result<Vec<String>, StoreError> {
        checker_replica_ok(replica, ttl)?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let reply = self.note(
            CHECKERS
                .run(
                    &self.client,
                    vec![self.keys.checkers()],
                    vec![replica.to_owned(), ttl_ms.to_string()],
                )
                .await,
        )?;
        let mut live = array_of(reply, "checkers")?
            .iter()
            .map(|v| {
                v.as_string()
                    .ok_or_else(|| StoreError::Corrupt(format!("checkers answered {v:?}")))
            })
            .collect::<Result<Vec<String>, StoreError>>()?;
        live.sort();
        Ok(live)
    }

    async fn get(&self, id: Ulid) -> Result<Option<ServiceRecord>, StoreError> {
        let key = self.keys.svc(id);
        let reply: Value = self.read(|| self.client.get(&key)).await?;
        record_from_value(id, &reply)
    }

    async fn listing(
        &self,
        filter: ListFilter,
        after: Option<Ulid>,
    ) -> Result<ValkeyListing, StoreError> {
        self.open_listing(filter, after).await
    }

    /// `ZCARD` of the all-index: live entries, plus hints of registrations that never
    /// completed and expired entries, until a reader or the sweeper drops them.
    async fn deregister_as(
        &self,
        id: Ulid,
        access: Access,
    ) -> Result<Option<ServiceRecord>, StoreError> {
        let store = self.clone();
        to_completion(Box::pin(
            async move { store.deregister_steps(id, access).await },
        ))
        .await
    }

    async fn sweep(&self) -> Result<usize, StoreError> {
        let now = self.server_now().await?;
        // The all-index pass is the reaper's (log.rs): it drops nothing without logging.
        let mut dropped = self.reap_index(now).await?.dropped;
        let names: Vec<String> = self.note(self.client.smembers(self.keys.names()).await)?;
        for chunk in names.chunks(BATCH) {
            dropped += self.sweep_names(chunk, now).await?;
        }
        Ok(dropped)
    }

    async fn health(&self) -> Result<StoreHealth, StoreError> {
        let started = Instant::now();
        let write = self.client.set::<(), _, _>(
            &*self.health_key,
            "1",
            Some(Expiration::PX(HEALTH_KEY_TTL_MS)),
            None,
            false,
        );
        if !self.client.is_clustered() {
            // First whether it answers at all (unhealthy), then whether it takes a write
            // (degraded): out of memory with `noeviction`, every register and ping fails while
            // PING still answers.
            let _: String = self.note(self.client.ping(None).await)?;
            let write_refused = self.note(write.await).err().map(|e| e.to_string());
            return Ok(StoreHealth {
                kind: "valkey",
                latency: started.elapsed(),
                write_refused,
                cluster: None,
            });
        }
        // A cluster: a PING would go to any one node. The write goes to the `{all}` slot that
        // every registration writes: no answer there is unhealthy, a refusal degraded. Every
        // master is asked about the cluster meanwhile (connection.rs): one down is degraded.
        let (write, cluster) = tokio::join!(Box::pin(write), Box::pin(self.cluster_health()));
        let write: Result<(), FredError> = write;
        let unanswered = write.as_ref().err().is_some_and(connection::no_answer);
        let write_refused = match self.note(write) {
            Ok(()) => None,
            Err(e) if unanswered => return Err(e),
            Err(e) => Some(e.to_string()),
        };
        Ok(StoreHealth {
            kind: "valkey",
            latency: started.elapsed(),
            write_refused,
            cluster: Some(cluster),
        })
    }

    async fn change_head(&self) -> Result<super::Cursor, StoreError> {
        self.log_head().await
    }

    async fn changes(
        &self,
        after: super::Cursor,
        limit: usize,
        wait: Duration,
    ) -> Result<super::Changes, StoreError> {
        self.log_changes(after, limit, wait).await
    }

    async fn reap(&self) -> Result<usize, StoreError> {
        let now = self.server_now().await?;
        Ok(self.reap_index(now).await?.logged)
    }

    async fn count(&self) -> Result<u64, StoreError> {
        let key = self.keys.all_idx();
        self.read(|| self.client.zcard(&key)).await
    }

    fn reconnects(&self) -> Option<prometheus_client::metrics::counter::Counter> {
        Some(self.conn.reconnects.clone())
    }
}
