//! The shared store: registrations in Valkey (or Redis), with real TTL expiry, so several
//! stateless orchestrators can share one registry (standalone or Cluster).
//!
//! Why it looks the way it does (the key layout, the record layout, the index consistency
//! rules, what is atomic and how connections behave) is in `docs/valkey-store.md`.

mod connection;
mod index;
mod keys;
mod list;
mod record;
mod scripts;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::clients::Client;
use fred::interfaces::{ClientLike, KeysInterface, SetsInterface, SortedSetsInterface};
use fred::types::Value;
use servicekit::protocol::{ServiceRecord, Timestamp};
use ulid::Ulid;

pub use connection::{COMMAND_TIMEOUT, TIMEOUTS_BEFORE_RECONNECT};
pub use keys::tag_text;
pub use list::ValkeyListing;

use connection::ConnState;
use index::{DropMode, BATCH};
use keys::Keys;
use record::{record_body, record_from_value, RawRecord, MAX_TTL};
use scripts::{DEREGISTER, PING, REGISTER};

use super::{
    id_fits_url, mint_id, ListFilter, Pinged, Registered, Registration, Store, StoreError,
    StoreHealth,
};

/// How often register re-reads the URL key when it loses a race.
const REGISTER_ATTEMPTS: usize = 8;

/// Registrations in Valkey. Cheap to clone: clones share one client and its connections.
#[derive(Clone)]
pub struct ValkeyStore {
    client: Client,
    keys: Keys,
    ttl: Duration,
    conn: Arc<ConnState>,
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
        (
            PING.lua(),
            vec![self.keys.svc(id)],
            vec![
                self.keys.url_prefix_of(id),
                id.to_string(),
                self.ttl_ms().to_string(),
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
        Ok(ValkeyStore {
            client,
            keys: Keys {
                prefix: Arc::from(prefix),
            },
            ttl,
            conn,
        })
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
        let _ = self.client.quit().await;
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
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

    async fn register(&self, reg: Registration) -> Result<Registered, StoreError> {
        let info_json = serde_json::to_string(&reg.info)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode info: {e}")))?;
        let name = reg.info.display_name.clone();
        let body = record_body(&reg.url, &name, &info_json);
        let url_key = self.keys.url(&reg.url);
        let mut rejected: Vec<Ulid> = Vec::new();
        for _ in 0..REGISTER_ATTEMPTS {
            let current: Option<String> = self.note(self.client.get(&url_key).await)?;
            let current_id = current
                .as_deref()
                .and_then(|s| Ulid::from_string(s).ok())
                .filter(|id| id_fits_url(*id, &reg.url) && !rejected.contains(id));
            let requested = reg
                .requested_id
                .filter(|id| id_fits_url(*id, &reg.url) && !rejected.contains(id));
            let chosen = current_id.or(requested);
            let id = chosen.unwrap_or_else(|| mint_id(&reg.url));
            // Index first, so the record is listed even if this call stops after the script.
            let hint = self.hint_score();
            self.add_hint(id, &name, hint).await?;
            let reply = self.note(
                REGISTER
                    .run(
                        &self.client,
                        vec![url_key.clone(), self.keys.svc(id), self.keys.gone(id)],
                        vec![
                            current.clone().unwrap_or_default(),
                            id.to_string(),
                            reg.url.clone(),
                            body.clone(),
                            self.ttl_ms().to_string(),
                        ],
                    )
                    .await,
            )?;
            let items = array_of(reply, "register")?;
            let status = items.first().and_then(Value::as_string).unwrap_or_default();
            match status.as_str() {
                "retry" | "conflict" => {
                    if status == "conflict" {
                        rejected.push(id);
                    }
                    // Nobody else knows an id minted here, so its hint can go at once. Hints
                    // on other ids may be someone else's entry: the sweeper handles those.
                    if chosen.is_none() {
                        self.unindex(id, &name, &hint.to_string(), DropMode::Equal)
                            .await;
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
            let previous = match (old_name, old_expires) {
                (Some(old), Some(expires)) if old != name => Some((old, expires)),
                _ => None,
            };
            self.settle(id, &name, expires_at, hint, previous).await;

            return Ok(Registered {
                record: ServiceRecord {
                    id,
                    url: reg.url,
                    info: reg.info,
                    registered_at,
                    last_updated: now,
                    last_ping_at: now,
                    expires_at,
                },
                created: status == "created",
            });
        }
        Err(StoreError::Unavailable(format!(
            "registration of {} kept racing with others; try again",
            reg.url
        )))
    }

    async fn ping(&self, id: Ulid) -> Result<Option<Pinged>, StoreError> {
        let (_, keys, args) = self.ping_command(id);
        let reply = self.note(PING.run(&self.client, keys, args).await)?;
        if reply.is_null() {
            return Ok(None);
        }
        let items = array_of(reply, "ping")?;
        match items.as_slice() {
            [last, expires] => Ok(Some(Pinged {
                id,
                last_ping_at: ms_of(last, "last_ping_at")?,
                expires_at: ms_of(expires, "expires_at")?,
            })),
            other => Err(StoreError::Corrupt(format!("ping answered {other:?}"))),
        }
    }

    async fn get(&self, id: Ulid) -> Result<Option<ServiceRecord>, StoreError> {
        let reply: Value = self.note(self.client.get(self.keys.svc(id)).await)?;
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
    async fn count(&self) -> Result<usize, StoreError> {
        self.note(self.client.zcard(self.keys.all_idx()).await)
    }

    async fn deregister(&self, id: Ulid) -> Result<Option<ServiceRecord>, StoreError> {
        let reply = self.note(
            DEREGISTER
                .run(
                    &self.client,
                    vec![self.keys.svc(id), self.keys.gone(id)],
                    vec![
                        self.keys.url_prefix_of(id),
                        id.to_string(),
                        self.ttl_ms().to_string(),
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
        // Only this version's entries: a re-registration racing with us scored higher.
        self.unindex(id, raw.name, &raw.expires_at.to_string(), DropMode::AtMost)
            .await;
        raw.into_record(id).map(Some)
    }

    async fn sweep(&self) -> Result<usize, StoreError> {
        let now = self.server_now().await?;
        let mut dropped = self.sweep_index(&self.keys.all_idx(), None, now).await?;
        let names: Vec<String> = self.note(self.client.smembers(self.keys.names()).await)?;
        for chunk in names.chunks(BATCH) {
            dropped += self.sweep_names(chunk, now).await?;
        }
        Ok(dropped)
    }

    async fn health(&self) -> Result<StoreHealth, StoreError> {
        let started = Instant::now();
        let _: String = self.note(self.client.ping(None).await)?;
        Ok(StoreHealth {
            kind: "valkey",
            latency: started.elapsed(),
        })
    }
}
