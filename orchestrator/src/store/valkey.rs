//! The shared store: registrations in Valkey (or Redis), with real TTL expiry.
//!
//! Several stateless orchestrators can point at one Valkey (standalone or Cluster) and see the
//! same registry. Expiry is Valkey's own key expiry, so an entry is gone the instant its TTL
//! runs out, whichever replica wrote it; all timestamps come from the server's clock
//! (`redis.call('TIME')` inside scripts) so replicas with skewed clocks still agree.
//!
//! # Key layout
//!
//! `P` is the configured prefix (`servicekit:` by default; it may not contain braces) and `T`
//! the *slot tag* of a registration: the last three Crockford characters of its id, which
//! encode the id's lowest 15 bits, the hash of its URL (see [`super::url_tag`]). For a lookup
//! by URL the same three characters are rendered from `url_tag(url)` ([`tag_text`]), so both
//! paths name the same keys. Everything in braces is the Cluster hash tag.
//!
//! | key                      | type   | content                                               |
//! |--------------------------|--------|-------------------------------------------------------|
//! | `P{T}:svc:<ID>`          | HASH   | `url`, `info` (JSON), `name` (display name), `registered_at`, `last_updated`, `last_ping_at`, `expires_at` (ms since epoch); `PEXPIRE ttl` |
//! | `P{T}:url:<URL>`         | STRING | the id registered for the canonical URL; same `PEXPIRE`, refreshed with the record |
//! | `P{all}:idx`             | ZSET   | every id, score = `expires_at` as last written by register or sweep |
//! | `P{n:<NAME>}:idx`        | ZSET   | ids with display name NAME, score likewise (the by-name index) |
//! | `P{all}:names`           | SET    | display names that have a by-name index, so the sweeper can find them |
//!
//! The record key is the truth; the sorted sets are hints that may briefly hold ids whose record
//! has expired. Readers skip those (and drop them on the way), [`Store::sweep`] drops the rest.
//! An index entry is only removed when its score is still the one the remover read, so a
//! concurrent re-registration (which always writes a newer score) is never dropped by mistake.
//!
//! # Atomicity
//!
//! Every operation that must be atomic is one Lua script on one slot:
//! - **register** compares-and-sets the URL key and writes the record (KEYS = URL key and
//!   record key, which share the tag `T`);
//! - **ping** touches only an existing record (never resurrects one) and refreshes its URL
//!   key. The URL key's name is derived *inside* the script from the record's `url` field; it
//!   is not declared in `KEYS` but lives in the same slot (same tag), so this works in Cluster;
//! - **deregister** reads and deletes the record and deletes the URL key if it still points at
//!   this id (same derivation as ping).
//!
//! Index maintenance after register and deregister is a separate pipelined round trip (the
//! indexes live in other slots).
//!
//! # Connection behaviour
//!
//! The fred client reconnects forever on its own (constant 250 ms delay). Every command is
//! bounded by [`COMMAND_TIMEOUT`], so while Valkey is unreachable each store call fails within
//! about two seconds with [`StoreError::Unavailable`] instead of hanging. [`ValkeyStore::connect`]
//! waits at most [`COMMAND_TIMEOUT`] for the first connection: when Valkey is not up yet it
//! logs `valkey.disconnected` and still returns the store, which connects in the background as
//! soon as Valkey appears (so an orchestrator may start before its Valkey). Only errors that
//! can never heal (a malformed URL, a bad prefix, a cluster URL against a non-cluster server)
//! fail `connect`. Connection changes are logged as `valkey.connected` (info) and
//! `valkey.disconnected` (warn).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::clients::{Client, Pipeline};
use fred::error::{Error as FredError, ErrorKind};
use fred::interfaces::{
    ClientLike, EventInterface, HashesInterface, KeysInterface, LuaInterface, SetsInterface,
    SortedSetsInterface,
};
use fred::types::config::{Config, ConnectionConfig, PerformanceConfig, ReconnectPolicy};
use fred::types::sorted_sets::Ordering as ZOrdering;
use fred::types::{Builder, ClusterHash, CustomCommand, SetOptions, Value};
use servicekit::protocol::{ServiceInfo, ServiceRecord, Timestamp};
use tokio::sync::OnceCell;
use ulid::Ulid;

use super::{
    id_fits_url, id_tag, mint_id, url_tag, ListFilter, Pinged, Registered, Registration, Store,
    StoreError, StoreHealth,
};

/// Upper bound of every command (and of the initial connection wait).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// URL schemes accepted: standalone and Cluster, plain TCP (TLS is not compiled in).
const SCHEMES: [&str; 4] = ["redis", "valkey", "redis-cluster", "valkey-cluster"];
/// Delay between reconnection attempts.
const RECONNECT_DELAY_MS: u32 = 250;
/// Records fetched per pipelined round trip when listing, candidates per sweep pass.
const BATCH: usize = 1000;
/// How often register re-reads the URL key when it loses a race.
const REGISTER_ATTEMPTS: usize = 8;

/// Crockford base32, the ULID text alphabet.
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Renders a 15-bit slot tag exactly as the last three characters of a ULID whose lowest 15
/// bits are `tag`.
pub fn tag_text(tag: u16) -> String {
    let t = usize::from(tag & 0x7fff);
    [t >> 10, (t >> 5) & 31, t & 31]
        .iter()
        .map(|&i| char::from(CROCKFORD[i]))
        .collect()
}

/// A registration's keys and the shared index keys for one prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: Arc<str>,
}

impl Keys {
    fn svc(&self, id: Ulid) -> String {
        format!("{}{{{}}}:svc:{id}", self.prefix, tag_text(id_tag(id)))
    }

    fn url(&self, url: &str) -> String {
        format!("{}{{{}}}:url:{url}", self.prefix, tag_text(url_tag(url)))
    }

    /// The URL key of `id`'s registration without the URL: scripts append the URL they read
    /// from the record.
    fn url_prefix_of(&self, id: Ulid) -> String {
        format!("{}{{{}}}:url:", self.prefix, tag_text(id_tag(id)))
    }

    fn all_idx(&self) -> String {
        format!("{}{{all}}:idx", self.prefix)
    }

    fn name_idx(&self, name: &str) -> String {
        format!("{}{{n:{name}}}:idx", self.prefix)
    }

    fn names(&self) -> String {
        format!("{}{{all}}:names", self.prefix)
    }
}

/// A Lua script run with `EVALSHA`, loaded on first use and re-sent with `EVAL` whenever a
/// node answers `NOSCRIPT` (a restarted server, another Cluster node).
#[derive(Debug)]
struct LuaScript {
    lua: &'static str,
    sha: OnceCell<String>,
}

impl LuaScript {
    const fn new(lua: &'static str) -> Self {
        LuaScript {
            lua,
            sha: OnceCell::const_new(),
        }
    }

    async fn run(
        &self,
        client: &Client,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Value, FredError> {
        let sha = self
            .sha
            .get_or_try_init(|| async { client.script_load::<String, _>(self.lua).await })
            .await?;
        match client
            .evalsha::<Value, _, _, _>(sha.as_str(), keys.clone(), args.clone())
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                client.eval::<Value, _, _, _>(self.lua, keys, args).await
            }
            other => other,
        }
    }
}

/// Lua that sets `now` to the server time in ms, `ttl` to `ARGV[$ttl_arg]`, and `nows`/`exps`
/// to the texts of `now` and `now + ttl` (integers, never exponent notation).
macro_rules! lua_now {
    ($ttl_arg:literal) => {
        concat!(
            "local t = redis.call('TIME')\n",
            "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n",
            "local ttl = tonumber(ARGV[",
            $ttl_arg,
            "])\n",
            "local nows = string.format('%.0f', now)\n",
            "local exps = string.format('%.0f', now + ttl)\n",
        )
    };
}

/// KEYS: url key, record key. ARGV: expected url-key value ('' = absent), id, url, info JSON,
/// display name, ttl ms.
static REGISTER: LuaScript = LuaScript::new(concat!(
    r#"
local cur = redis.call('GET', KEYS[1])
if not cur then cur = '' end
if cur ~= ARGV[1] then return {'retry'} end
local old = redis.call('HMGET', KEYS[2], 'url', 'registered_at', 'name')
if old[1] and old[1] ~= ARGV[3] then return {'conflict'} end
"#,
    lua_now!(6),
    r#"
local status = 'updated'
local reg = old[2]
if (not old[1]) or (not reg) then
  status = 'created'
  reg = nows
end
redis.call('HSET', KEYS[2], 'url', ARGV[3], 'info', ARGV[4], 'name', ARGV[5],
  'registered_at', reg, 'last_updated', nows, 'last_ping_at', nows, 'expires_at', exps)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
return {status, reg, nows, exps, old[3]}
"#
));

/// KEYS: record key. ARGV: url key prefix (same slot), id, ttl ms.
/// Returns nil for a missing record (never resurrects), else {last_ping_at, expires_at}.
static PING: LuaScript = LuaScript::new(concat!(
    r#"
local url = redis.call('HGET', KEYS[1], 'url')
if not url then return false end
"#,
    lua_now!(3),
    r#"
redis.call('HSET', KEYS[1], 'last_ping_at', nows, 'expires_at', exps)
redis.call('PEXPIRE', KEYS[1], ttl)
local ukey = ARGV[1] .. url
local cur = redis.call('GET', ukey)
if cur == ARGV[2] then
  redis.call('PEXPIRE', ukey, ttl)
elseif not cur then
  redis.call('SET', ukey, ARGV[2], 'PX', ttl)
end
return {nows, exps}
"#
));

/// KEYS: record key. ARGV: url key prefix (same slot), id.
/// Returns nil for a missing record, else the record's fields as HGETALL pairs.
static DEREGISTER: LuaScript = LuaScript::new(
    r#"
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return false end
redis.call('DEL', KEYS[1])
local url = nil
for i = 1, #h, 2 do
  if h[i] == 'url' then url = h[i + 1] end
end
if url then
  local ukey = ARGV[1] .. url
  if redis.call('GET', ukey) == ARGV[2] then redis.call('DEL', ukey) end
end
return h
"#,
);

/// KEYS: one index. ARGV: id, score, id, score, ... Removes each id whose score is still the
/// one given (a re-registration in between wrote a newer score and is kept). Returns the count.
static INDEX_DROP: LuaScript = LuaScript::new(
    r#"
local n = 0
for i = 1, #ARGV, 2 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"#,
);

/// Registrations in Valkey. Cheap to clone: clones share one client and its connections.
#[derive(Clone)]
pub struct ValkeyStore {
    client: Client,
    keys: Keys,
    ttl: Duration,
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
    /// Connects to `url` (`redis://`, `valkey://`, `redis-cluster://`, `valkey-cluster://` ...)
    /// and keys everything under `prefix`. See the module docs for the connection behaviour.
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
        if ttl.is_zero() {
            return Err(StoreError::Config("the TTL must be positive".into()));
        }
        let scheme = url.split("://").next().unwrap_or("");
        if !SCHEMES.contains(&scheme) || !url.contains("://") {
            return Err(StoreError::Config(format!(
                "invalid Valkey URL {url:?}: the scheme must be one of {}",
                SCHEMES.join(", ")
            )));
        }
        let mut config = Config::from_url(url)
            .map_err(|e| StoreError::Config(format!("invalid Valkey URL {url:?}: {e}")))?;
        // Retry the first connection like any later one instead of failing at once.
        config.fail_fast = false;
        let connection = ConnectionConfig {
            connection_timeout: COMMAND_TIMEOUT,
            internal_command_timeout: COMMAND_TIMEOUT,
            unresponsive: fred::types::config::UnresponsiveConfig {
                max_timeout: Some(COMMAND_TIMEOUT * 2),
                interval: Duration::from_millis(500),
            },
            ..ConnectionConfig::default()
        };
        let performance = PerformanceConfig {
            default_command_timeout: COMMAND_TIMEOUT,
            ..PerformanceConfig::default()
        };
        let client = Builder::from_config(config)
            .set_connection_config(connection)
            .set_performance_config(performance)
            .set_policy(ReconnectPolicy::new_constant(0, RECONNECT_DELAY_MS))
            .build()
            .map_err(|e| StoreError::Config(format!("invalid Valkey configuration: {e}")))?;

        watch_connection(&client);
        let _task = client.connect();
        match tokio::time::timeout(COMMAND_TIMEOUT, client.wait_for_connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if matches!(e.kind(), ErrorKind::Config | ErrorKind::Url) => {
                let _ = client.quit().await;
                return Err(StoreError::Config(format!(
                    "cannot use Valkey at {url}: {e}"
                )));
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, detail = "Valkey not reachable yet; retrying in the background", "valkey.disconnected");
            }
            Err(_) => {
                tracing::warn!(
                    detail = "Valkey not reachable yet; retrying in the background",
                    "valkey.disconnected"
                );
            }
        }
        Ok(ValkeyStore {
            client,
            keys: Keys {
                prefix: Arc::from(prefix),
            },
            ttl,
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

    async fn server_now(&self) -> Result<u64, StoreError> {
        let cmd = CustomCommand::new_static("TIME", ClusterHash::Random, false);
        let parts: Vec<String> = self
            .client
            .custom(cmd, Vec::<String>::new())
            .await
            .map_err(map_err)?;
        let secs = parts.first().and_then(|s| s.parse::<u64>().ok());
        let micros = parts.get(1).and_then(|s| s.parse::<u64>().ok());
        match (secs, micros) {
            (Some(s), Some(us)) => Ok(s * 1000 + us / 1000),
            _ => Err(StoreError::Corrupt(format!("TIME answered {parts:?}"))),
        }
    }

    /// Fetches the records of `ids` in pipelined batches. Missing ones come back as `None`.
    async fn fetch(&self, ids: &[Ulid]) -> Result<Vec<Option<ServiceRecord>>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(BATCH) {
            let pipeline = self.client.pipeline();
            for id in chunk {
                queue(pipeline.hgetall::<(), _>(self.keys.svc(*id)).await)?;
            }
            let replies: Vec<Value> = pipeline.all().await.map_err(map_err)?;
            if replies.len() != chunk.len() {
                return Err(StoreError::Corrupt(format!(
                    "pipeline of {} HGETALL answered {} replies",
                    chunk.len(),
                    replies.len()
                )));
            }
            for (id, reply) in chunk.iter().zip(replies) {
                out.push(record_from_value(*id, reply)?);
            }
        }
        Ok(out)
    }

    /// Reads every member of an index with its score.
    async fn read_index(&self, key: &str) -> Result<Vec<(String, f64)>, StoreError> {
        self.client
            .zrange(key, 0, -1, None, false, None, true)
            .await
            .map_err(map_err)
    }

    /// Drops the given (member, score) pairs from `index` unless their score changed meanwhile.
    async fn drop_from_index(
        &self,
        index: &str,
        entries: &[(String, f64)],
    ) -> Result<usize, StoreError> {
        let mut dropped = 0;
        for chunk in entries.chunks(BATCH) {
            let args: Vec<String> = chunk
                .iter()
                .flat_map(|(member, score)| [member.clone(), score_text(*score)])
                .collect();
            let n = INDEX_DROP
                .run(&self.client, vec![index.to_owned()], args)
                .await
                .map_err(map_err)?;
            dropped += usize::try_from(int_of(&n)?).unwrap_or(0);
        }
        Ok(dropped)
    }

    /// Lists the live records of one index, dropping dead members from it on the way.
    async fn list_index(&self, index: &str) -> Result<Vec<ServiceRecord>, StoreError> {
        let entries = self.read_index(index).await?;
        let mut ids = Vec::with_capacity(entries.len());
        let mut dead = Vec::new();
        for (member, score) in &entries {
            match Ulid::from_string(member) {
                Ok(id) => ids.push((id, member, *score)),
                // Not ours to interpret; drop it so it cannot pile up.
                Err(_) => dead.push((member.clone(), *score)),
            }
        }
        let only_ids: Vec<Ulid> = ids.iter().map(|(id, _, _)| *id).collect();
        let records = self.fetch(&only_ids).await?;
        let mut live = Vec::with_capacity(records.len());
        for ((_, member, score), record) in ids.into_iter().zip(records) {
            match record {
                Some(r) => live.push(r),
                None => dead.push((member.clone(), score)),
            }
        }
        if !dead.is_empty() {
            // Cleanup is best effort: the listing itself is already correct.
            if let Err(e) = self.drop_from_index(index, &dead).await {
                tracing::debug!(error = %e, index, "index cleanup on read failed");
            }
        }
        Ok(live)
    }

    /// Sweeps one index; returns how many entries were dropped.
    async fn sweep_index(&self, index: &str, now: u64) -> Result<usize, StoreError> {
        let mut dropped = 0;
        loop {
            let candidates: Vec<(String, f64)> = self
                .client
                .zrangebyscore(index, "-inf", now as f64, true, Some((0, BATCH as i64)))
                .await
                .map_err(map_err)?;
            if candidates.is_empty() {
                break;
            }
            let pipeline = self.client.pipeline();
            let mut checked = Vec::with_capacity(candidates.len());
            let mut dead = Vec::new();
            for (member, score) in &candidates {
                match Ulid::from_string(member) {
                    Ok(id) => {
                        queue(
                            pipeline
                                .hget::<(), _, _>(self.keys.svc(id), "expires_at")
                                .await,
                        )?;
                        checked.push((member.clone(), *score));
                    }
                    Err(_) => dead.push((member.clone(), *score)),
                }
            }
            let expiries: Vec<Option<String>> = if checked.is_empty() {
                Vec::new()
            } else {
                pipeline.all().await.map_err(map_err)?
            };
            let mut progress = 0;
            let rescore = self.client.pipeline();
            let mut rescored = 0;
            for ((member, score), expires) in checked.into_iter().zip(expiries) {
                match expires.and_then(|e| e.parse::<u64>().ok()) {
                    None => dead.push((member, score)),
                    Some(expires_at) => {
                        if expires_at > now {
                            progress += 1;
                        }
                        queue(
                            rescore
                                .zadd::<(), _, _>(
                                    index,
                                    Some(SetOptions::XX),
                                    Some(ZOrdering::GreaterThan),
                                    false,
                                    false,
                                    (expires_at as f64, member),
                                )
                                .await,
                        )?;
                        rescored += 1;
                    }
                }
            }
            if rescored > 0 {
                let _: Vec<Value> = rescore.all().await.map_err(map_err)?;
            }
            if !dead.is_empty() {
                let n = self.drop_from_index(index, &dead).await?;
                dropped += n;
                progress += n;
            }
            if candidates.len() < BATCH || progress == 0 {
                break;
            }
        }
        Ok(dropped)
    }
}

/// Logs connection changes: `valkey.connected` once per (re)connection and `valkey.disconnected`
/// once per outage (not for every failed reconnection attempt).
fn watch_connection(client: &Client) {
    let up = Arc::new(AtomicBool::new(false));
    // Whether an outage was already reported (also covers "down at startup").
    let reported = Arc::new(AtomicBool::new(false));
    {
        let up = up.clone();
        let reported = reported.clone();
        client.on_reconnect(move |server| {
            if !up.swap(true, AtomicOrdering::SeqCst) {
                reported.store(false, AtomicOrdering::SeqCst);
                tracing::info!(server = %server, detail = "connected to Valkey", "valkey.connected");
            }
            async { Ok(()) }
        });
    }
    {
        let up = up.clone();
        let reported = reported.clone();
        client.on_error(move |(error, server)| {
            let was_up = up.swap(false, AtomicOrdering::SeqCst);
            if was_up || !reported.swap(true, AtomicOrdering::SeqCst) {
                reported.store(true, AtomicOrdering::SeqCst);
                let server = server.map(|s| s.to_string()).unwrap_or_default();
                tracing::warn!(server, error = %error, detail = "lost the connection to Valkey; reconnecting", "valkey.disconnected");
            } else {
                tracing::debug!(error = %error, "Valkey reconnection attempt failed");
            }
            async { Ok(()) }
        });
    }
    client.on_unresponsive(move |server| {
        if up.swap(false, AtomicOrdering::SeqCst) {
            reported.store(true, AtomicOrdering::SeqCst);
            tracing::warn!(server = %server, detail = "Valkey connection unresponsive; reconnecting", "valkey.disconnected");
        }
        async { Ok(()) }
    });
}

/// Maps a client error: anything about reaching the server is `Unavailable`, anything about
/// what it answered is `Corrupt`.
fn map_err(e: FredError) -> StoreError {
    match e.kind() {
        ErrorKind::Parse | ErrorKind::Protocol | ErrorKind::NotFound => {
            StoreError::Corrupt(e.to_string())
        }
        ErrorKind::InvalidArgument if e.details().starts_with("WRONGTYPE") => {
            StoreError::Corrupt(e.to_string())
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

/// Checks that a command was queued in a pipeline.
fn queue(r: Result<(), FredError>) -> Result<(), StoreError> {
    r.map_err(map_err)
}

/// Scores are integral milliseconds; render them without a fraction so Lua compares exactly.
fn score_text(score: f64) -> String {
    format!("{score:.0}")
}

fn int_of(v: &Value) -> Result<i64, StoreError> {
    match v {
        Value::Integer(i) => Ok(*i),
        other => other
            .as_string()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| StoreError::Corrupt(format!("expected an integer, got {other:?}"))),
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

/// A record from its HGETALL reply; `None` for a missing (expired or deleted) key.
fn record_from_value(id: Ulid, v: Value) -> Result<Option<ServiceRecord>, StoreError> {
    let map: HashMap<String, String> = match v {
        Value::Null => return Ok(None),
        other => other
            .convert()
            .map_err(|e| StoreError::Corrupt(format!("record {id}: not a field map: {e}")))?,
    };
    record_from_map(id, map)
}

fn record_from_map(
    id: Ulid,
    mut map: HashMap<String, String>,
) -> Result<Option<ServiceRecord>, StoreError> {
    if map.is_empty() {
        return Ok(None);
    }
    let mut field = |name: &str| {
        map.remove(name)
            .ok_or_else(|| StoreError::Corrupt(format!("record {id}: missing field {name}")))
    };
    let ms = |text: String, name: &str| {
        text.parse::<u64>()
            .map(Timestamp::from_millis)
            .map_err(|_| StoreError::Corrupt(format!("record {id}: bad {name}: {text:?}")))
    };
    let url = field("url")?;
    let info_json = field("info")?;
    let info: ServiceInfo = serde_json::from_str(&info_json)
        .map_err(|e| StoreError::Corrupt(format!("record {id}: bad info JSON: {e}")))?;
    let registered_at = ms(field("registered_at")?, "registered_at")?;
    let last_updated = ms(field("last_updated")?, "last_updated")?;
    let last_ping_at = ms(field("last_ping_at")?, "last_ping_at")?;
    let expires_at = ms(field("expires_at")?, "expires_at")?;
    Ok(Some(ServiceRecord {
        id,
        url,
        info,
        registered_at,
        last_updated,
        last_ping_at,
        expires_at,
    }))
}

/// Flat `field, value, ...` pairs (a script's HGETALL) into a map.
fn pairs_to_map(items: Vec<Value>) -> Result<HashMap<String, String>, StoreError> {
    if items.len() % 2 != 0 {
        return Err(StoreError::Corrupt(
            "odd number of hash reply elements".into(),
        ));
    }
    let mut map = HashMap::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let k = k
            .as_string()
            .ok_or_else(|| StoreError::Corrupt(format!("hash field name {k:?}")))?;
        let v = v
            .as_string()
            .ok_or_else(|| StoreError::Corrupt(format!("hash field value {v:?}")))?;
        map.insert(k, v);
    }
    Ok(map)
}

/// Queues the commands that index `id` under `name` with score `expires_at`.
async fn queue_index_add(
    pipeline: &Pipeline<Client>,
    keys: &Keys,
    id: Ulid,
    name: &str,
    expires_at: Timestamp,
) -> Result<(), StoreError> {
    let score = expires_at.as_millis() as f64;
    let member = id.to_string();
    queue(
        pipeline
            .zadd::<(), _, _>(
                keys.all_idx(),
                None,
                None,
                false,
                false,
                (score, member.clone()),
            )
            .await,
    )?;
    queue(
        pipeline
            .zadd::<(), _, _>(
                keys.name_idx(name),
                None,
                None,
                false,
                false,
                (score, member),
            )
            .await,
    )?;
    queue(pipeline.sadd::<(), _, _>(keys.names(), name).await)
}

impl Store for ValkeyStore {
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
        let url_key = self.keys.url(&reg.url);
        let mut rejected: Vec<Ulid> = Vec::new();
        for _ in 0..REGISTER_ATTEMPTS {
            let current: Option<String> = self.client.get(&url_key).await.map_err(map_err)?;
            let current_id = current
                .as_deref()
                .and_then(|s| Ulid::from_string(s).ok())
                .filter(|id| id_fits_url(*id, &reg.url) && !rejected.contains(id));
            let requested = reg
                .requested_id
                .filter(|id| id_fits_url(*id, &reg.url) && !rejected.contains(id));
            let id = current_id
                .or(requested)
                .unwrap_or_else(|| mint_id(&reg.url));
            let reply = REGISTER
                .run(
                    &self.client,
                    vec![url_key.clone(), self.keys.svc(id)],
                    vec![
                        current.clone().unwrap_or_default(),
                        id.to_string(),
                        reg.url.clone(),
                        info_json.clone(),
                        name.clone(),
                        self.ttl_ms().to_string(),
                    ],
                )
                .await
                .map_err(map_err)?;
            let items = array_of(reply, "register")?;
            let status = items.first().and_then(Value::as_string).unwrap_or_default();
            match status.as_str() {
                "retry" => continue,
                "conflict" => {
                    rejected.push(id);
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

            let pipeline = self.client.pipeline();
            queue_index_add(&pipeline, &self.keys, id, &name, expires_at).await?;
            if let Some(old) = old_name.filter(|old| *old != name) {
                queue(
                    pipeline
                        .zrem::<(), _, _>(self.keys.name_idx(&old), id.to_string())
                        .await,
                )?;
            }
            let _: Vec<Value> = pipeline.all().await.map_err(map_err)?;

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
        let reply = PING
            .run(
                &self.client,
                vec![self.keys.svc(id)],
                vec![
                    self.keys.url_prefix_of(id),
                    id.to_string(),
                    self.ttl_ms().to_string(),
                ],
            )
            .await
            .map_err(map_err)?;
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
        let reply: Value = self
            .client
            .hgetall(self.keys.svc(id))
            .await
            .map_err(map_err)?;
        record_from_value(id, reply)
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<ServiceRecord>, StoreError> {
        let mut records = if let Some(url) = &filter.url {
            let id: Option<String> = self.client.get(self.keys.url(url)).await.map_err(map_err)?;
            match id.as_deref().map(Ulid::from_string) {
                Some(Ok(id)) => self.get(id).await?.into_iter().collect(),
                Some(Err(_)) | None => Vec::new(),
            }
        } else if let Some(name) = &filter.display_name {
            self.list_index(&self.keys.name_idx(name)).await?
        } else {
            self.list_index(&self.keys.all_idx()).await?
        };
        records.retain(|r| filter.matches(r));
        records.sort_by_key(|r| r.id);
        records.dedup_by_key(|r| r.id);
        Ok(records)
    }

    async fn deregister(&self, id: Ulid) -> Result<Option<ServiceRecord>, StoreError> {
        let reply = DEREGISTER
            .run(
                &self.client,
                vec![self.keys.svc(id)],
                vec![self.keys.url_prefix_of(id), id.to_string()],
            )
            .await
            .map_err(map_err)?;
        if reply.is_null() {
            return Ok(None);
        }
        let map = pairs_to_map(array_of(reply, "deregister")?)?;
        let name = map.get("name").cloned();
        let record = record_from_map(id, map)?;
        let pipeline = self.client.pipeline();
        queue(
            pipeline
                .zrem::<(), _, _>(self.keys.all_idx(), id.to_string())
                .await,
        )?;
        let name = name.or_else(|| record.as_ref().map(|r| r.info.display_name.clone()));
        if let Some(name) = name {
            queue(
                pipeline
                    .zrem::<(), _, _>(self.keys.name_idx(&name), id.to_string())
                    .await,
            )?;
        }
        let _: Vec<Value> = pipeline.all().await.map_err(map_err)?;
        Ok(record)
    }

    async fn sweep(&self) -> Result<usize, StoreError> {
        let now = self.server_now().await?;
        let mut dropped = self.sweep_index(&self.keys.all_idx(), now).await?;
        let names: Vec<String> = self
            .client
            .smembers(self.keys.names())
            .await
            .map_err(map_err)?;
        for name in names {
            let index = self.keys.name_idx(&name);
            dropped += self.sweep_index(&index, now).await?;
            let left: u64 = self.client.zcard(&index).await.map_err(map_err)?;
            if left == 0 {
                let _: i64 = self
                    .client
                    .srem(self.keys.names(), name.as_str())
                    .await
                    .map_err(map_err)?;
                // A registration may have indexed the name between ZCARD and SREM: put it back.
                let left: u64 = self.client.zcard(&index).await.map_err(map_err)?;
                if left > 0 {
                    let _: i64 = self
                        .client
                        .sadd(self.keys.names(), name.as_str())
                        .await
                        .map_err(map_err)?;
                }
            }
        }
        Ok(dropped)
    }

    async fn health(&self) -> Result<StoreHealth, StoreError> {
        let started = Instant::now();
        let _: String = self.client.ping(None).await.map_err(map_err)?;
        Ok(StoreHealth {
            kind: "valkey",
            latency: started.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_text_matches_the_last_three_id_characters() {
        for tag in [0u16, 1, 31, 32, 1023, 1024, 0x5555, 0x7fff] {
            let id = Ulid(u128::from(tag));
            assert_eq!(tag_text(tag), id.to_string()[23..], "tag {tag}");
        }
        for url in ["http://a:1", "https://b.example/x", "http://svc:8000"] {
            let id = mint_id(url);
            assert_eq!(tag_text(url_tag(url)), id.to_string()[23..]);
        }
    }

    #[test]
    fn keys_of_one_registration_share_a_tag() {
        let keys = Keys {
            prefix: Arc::from("p:"),
        };
        let url = "http://svc:8000";
        let id = mint_id(url);
        let tag = &id.to_string()[23..];
        assert_eq!(keys.svc(id), format!("p:{{{tag}}}:svc:{id}"));
        assert_eq!(keys.url(url), format!("p:{{{tag}}}:url:{url}"));
        assert_eq!(keys.url_prefix_of(id) + url, keys.url(url));
        assert_eq!(keys.name_idx("A"), "p:{n:A}:idx");
        assert_eq!(keys.all_idx(), "p:{all}:idx");
        assert_eq!(keys.names(), "p:{all}:names");
    }

    #[test]
    fn scores_render_as_integers() {
        assert_eq!(score_text(1_761_566_430_123.0), "1761566430123");
    }
}
