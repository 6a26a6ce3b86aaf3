//! The shared store: registrations in Valkey (or Redis), with real TTL expiry, so several
//! stateless orchestrators can share one registry (standalone or Cluster).
//!
//! Why it looks the way it does (the key layout, the record layout, the index consistency
//! rules, what is atomic and how connections behave) is in `docs/valkey-store.md`.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::clients::Client;
use fred::error::{Error as FredError, ErrorKind};
use fred::interfaces::{
    ClientLike, EventInterface, KeysInterface, LuaInterface, SetsInterface, SortedSetsInterface,
};
use fred::socket2::TcpKeepalive;
use fred::types::config::{
    Config, ConnectionConfig, PerformanceConfig, ReconnectPolicy, TcpConfig, UnresponsiveConfig,
};
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
/// How far a register's index hint lies beyond the real expiry: longer than any stall a
/// register could survive, shorter than a dead hint should linger.
const HINT_MARGIN: Duration = Duration::from_secs(3600);
/// Commands timing out in a row before the connection is considered hung and replaced.
pub const TIMEOUTS_BEFORE_RECONNECT: u32 = 3;
/// How long a forced reconnection may block the next one (the client keeps trying anyway).
const FORCED_RECONNECT_WAIT: Duration = Duration::from_secs(30);
/// Idle time before TCP keepalive probes start, and their interval.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

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

    /// The tombstone of `id`'s last deregistration.
    fn gone(&self, id: Ulid) -> String {
        format!("{}{{{}}}:gone:{id}", self.prefix, tag_text(id_tag(id)))
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

/// Lua helpers for the record layout (see `docs/valkey-store.md`):
/// - `stamp(v, i)`: the `i`-th header timestamp (0 = `registered_at` ... 3 = `expires_at`) as a
///   number, nil when it is not 13 digits;
/// - `stamp_text(ms)`: `ms` as exactly 13 zero-padded digits (longer only past the year 2286,
///   which [`ValkeyStore::connect`] rules out by bounding the TTL; callers still check);
/// - `field(v, p)`: the length-prefixed text at byte `p` (1-based) and the position after it,
///   nil when malformed;
/// - `malformed(key)`: the error reply for a record that does not follow the layout
///   (`CORRUPT ...`, mapped to [`StoreError::Corrupt`]).
macro_rules! lua_record {
    () => {
        r#"
local function stamp(v, i)
  local s = string.sub(v, i * 13 + 1, i * 13 + 13)
  if not string.find(s, '^%d%d%d%d%d%d%d%d%d%d%d%d%d$') then return nil end
  return tonumber(s)
end
local function stamp_text(ms)
  return string.format('%013.0f', ms)
end
local function field(v, p)
  local n, s = string.match(v, '^(%d+):()', p)
  if not n then return nil end
  local e = s + tonumber(n)
  if e - 1 > #v then return nil end
  return string.sub(v, s, e - 1), e
end
local function malformed(key)
  return redis.error_reply('CORRUPT servicekit record ' .. key .. ' does not follow the layout')
end
"#
    };
}

/// Digits of every header timestamp of a record.
const STAMP_DIGITS: usize = 13;
/// Length of a record's header, the four timestamps; its URL starts right after. The Lua
/// scripts spell these offsets out (a unit test checks they agree).
const HEADER_LEN: usize = 4 * STAMP_DIGITS;
/// The longest TTL accepted, so that expiries fit the 13 header digits (see [`lua_record`])
/// until past the year 2180.
const MAX_TTL: Duration = Duration::from_secs(100 * 366 * 24 * 3600);

/// KEYS: url key, record key, tombstone. ARGV: expected url-key value ('' = absent), id, url,
/// record body ([`record_body`]: everything after the header), ttl ms.
/// Returns {'retry'}, {'conflict'} or {status, registered_at, now, expires_at, old name,
/// old expires_at}.
static REGISTER: LuaScript = LuaScript::new(concat!(
    lua_record!(),
    r#"
local cur = redis.call('GET', KEYS[1])
if not cur then cur = '' end
if cur ~= ARGV[1] then return {'retry'} end
local old = redis.call('GET', KEYS[2])
local reg = nil
local old_name = false
local old_exp = false
if old then
  local url, p = field(old, 53)
  local name = url and field(old, p)
  reg = stamp(old, 0)
  old_exp = stamp(old, 3)
  if not (name and reg and old_exp) then return malformed(KEYS[2]) end
  if url ~= ARGV[3] then return {'conflict'} end
  old_name = name
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[5])
-- Expire later than any earlier version of this id (replaced or deregistered), even in the
-- same millisecond: index removals compare scores with those versions' expires_at.
local floor = old_exp or 0
local gone = tonumber(redis.call('GET', KEYS[3])) or 0
if gone > floor then floor = gone end
if now + ttl <= floor then now = floor - ttl + 1 end
local status = 'updated'
if not reg then
  status = 'created'
  reg = now
end
local header = stamp_text(reg) .. stamp_text(now) .. stamp_text(now) .. stamp_text(now + ttl)
if #header ~= 52 then return redis.error_reply('ERR expiry beyond 13 digits') end
redis.call('SET', KEYS[2], header .. ARGV[4], 'PX', ttl)
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
redis.call('DEL', KEYS[3])
local function text(ms) return string.format('%.0f', ms) end
if old_exp then old_exp = text(old_exp) end
return {status, text(reg), text(now), text(now + ttl), old_name, old_exp}
"#
));

/// KEYS: record key. ARGV: url key prefix (same slot), id, ttl ms.
/// Returns nil for a missing record (never resurrects), else {last_ping_at, expires_at}.
static PING: LuaScript = LuaScript::new(concat!(
    lua_record!(),
    r#"
local v = redis.call('GET', KEYS[1])
if not v then return false end
local url = field(v, 53)
if not url then return malformed(KEYS[1]) end
"#,
    lua_now!(3),
    r#"
local stamps = stamp_text(now) .. stamp_text(now + ttl)
if #stamps ~= 26 then return redis.error_reply('ERR expiry beyond 13 digits') end
-- The key exists (time stands still inside a script), so SETRANGE cannot create one; it
-- keeps the TTL, which PEXPIRE then renews.
redis.call('SETRANGE', KEYS[1], 26, stamps)
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

/// KEYS: record key, tombstone. ARGV: url key prefix (same slot), id, ttl ms.
/// Returns nil for a missing record, else the record's value. A malformed record is deleted
/// too (its URL key and tombstone only as far as they can be read from it).
static DEREGISTER: LuaScript = LuaScript::new(concat!(
    lua_record!(),
    r#"
local v = redis.call('GET', KEYS[1])
if not v then return false end
redis.call('DEL', KEYS[1])
-- A re-registration must expire later than this record did (see REGISTER).
local exp = stamp(v, 3)
if exp then redis.call('SET', KEYS[2], string.format('%.0f', exp), 'PX', ARGV[3]) end
local url = field(v, 53)
if url then
  local ukey = ARGV[1] .. url
  if redis.call('GET', ukey) == ARGV[2] then redis.call('DEL', ukey) end
end
return v
"#
));

/// KEYS: one index. ARGV: mode, then id, score, id, score, ... Removes each id whose score is
/// still the one given (mode `eq`), or at most the one given (mode `le`). Returns the count.
static INDEX_DROP: LuaScript = LuaScript::new(
    r#"
local le = ARGV[1] == 'le'
local n = 0
for i = 2, #ARGV, 2 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s then
    s = tonumber(s)
    local limit = tonumber(ARGV[i + 1])
    if s == limit or (le and s < limit) then
      redis.call('ZREM', KEYS[1], ARGV[i])
      n = n + 1
    end
  end
end
return n
"#,
);

/// KEYS: one index. ARGV: id, expires_at, the caller's hint score. Sets the id's score to
/// `expires_at` unless a higher score other than the caller's own hint is there (a newer
/// registration's hint or expiry), so a late caller never lowers a newer score.
static INDEX_SETTLE: LuaScript = LuaScript::new(
    r#"
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s then
  s = tonumber(s)
  if s ~= tonumber(ARGV[3]) and s >= tonumber(ARGV[2]) then return 0 end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
"#,
);

/// Whether an index entry is dropped with an exact score match or any score up to it.
#[derive(Debug, Clone, Copy)]
enum DropMode {
    Equal,
    AtMost,
}

impl DropMode {
    fn arg(self) -> &'static str {
        match self {
            DropMode::Equal => "eq",
            DropMode::AtMost => "le",
        }
    }
}

/// Connection bookkeeping shared by all clones of a store and its event handlers.
#[derive(Debug, Default)]
struct ConnState {
    /// Whether the client is connected, as last reported (to log once per outage).
    up: AtomicBool,
    /// Whether the current outage was already logged (also covers "down at startup").
    reported: AtomicBool,
    /// Commands that timed out in a row; any success resets it.
    timeouts: AtomicU32,
    /// Whether a forced reconnection is under way.
    forcing: AtomicBool,
}

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
            PING.lua,
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
            // Never re-send a command after a reconnection: scripts are not idempotent, and a
            // caller that got an error must not see the write happen twice.
            max_command_attempts: 1,
            unresponsive: UnresponsiveConfig {
                max_timeout: Some(COMMAND_TIMEOUT * 2),
                interval: Duration::from_millis(500),
            },
            tcp: TcpConfig {
                keepalive: Some(keepalive()),
                ..TcpConfig::default()
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

        let conn = Arc::new(ConnState::default());
        watch_connection(&client, &conn);
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

    /// Maps a command's outcome to the store's, tracking timeouts in a row to replace a hung
    /// connection: fred's own unresponsiveness check measures from the last write, so steady
    /// traffic to a stopped or black-holed server would keep it from ever firing.
    fn note<T>(&self, r: Result<T, FredError>) -> Result<T, StoreError> {
        match &r {
            Ok(_) => self.conn.timeouts.store(0, AtomicOrdering::SeqCst),
            Err(e) if matches!(e.kind(), ErrorKind::Timeout) => self.timed_out(),
            Err(_) => {}
        }
        r.map_err(map_err)
    }

    fn timed_out(&self) {
        let n = self.conn.timeouts.fetch_add(1, AtomicOrdering::SeqCst) + 1;
        // Only a connection the client believes healthy needs forcing; otherwise it is
        // already reconnecting.
        if n < TIMEOUTS_BEFORE_RECONNECT
            || !self.client.is_connected()
            || self.conn.forcing.swap(true, AtomicOrdering::SeqCst)
        {
            return;
        }
        if self.conn.up.swap(false, AtomicOrdering::SeqCst) {
            self.conn.reported.store(true, AtomicOrdering::SeqCst);
            tracing::warn!(
                timeouts = n,
                detail = "Valkey commands keep timing out; replacing the connection",
                "valkey.disconnected"
            );
        }
        let client = self.client.clone();
        let conn = self.conn.clone();
        tokio::spawn(async move {
            // The outcome does not matter: the client keeps reconnecting on its own.
            let _ = tokio::time::timeout(FORCED_RECONNECT_WAIT, client.force_reconnection()).await;
            conn.timeouts.store(0, AtomicOrdering::SeqCst);
            conn.forcing.store(false, AtomicOrdering::SeqCst);
        });
    }

    async fn server_now(&self) -> Result<u64, StoreError> {
        let cmd = CustomCommand::new_static("TIME", ClusterHash::Random, false);
        let parts: Vec<String> = self.note(self.client.custom(cmd, Vec::<String>::new()).await)?;
        let secs = parts.first().and_then(|s| s.parse::<u64>().ok());
        let micros = parts.get(1).and_then(|s| s.parse::<u64>().ok());
        match (secs, micros) {
            (Some(s), Some(us)) => Ok(s * 1000 + us / 1000),
            _ => Err(StoreError::Corrupt(format!("TIME answered {parts:?}"))),
        }
    }

    /// The score a register gives its id before writing the record: above any real expiry.
    fn hint_score(&self) -> u64 {
        Timestamp::now()
            .saturating_add(self.ttl + HINT_MARGIN)
            .as_millis()
    }

    /// Indexes `id` under `name` with the hint score, before its record is written.
    async fn add_hint(&self, id: Ulid, name: &str, hint: u64) -> Result<(), StoreError> {
        let pipeline = self.client.pipeline();
        let member = id.to_string();
        let score = hint as f64;
        for index in [self.keys.all_idx(), self.keys.name_idx(name)] {
            queue(
                pipeline
                    .zadd::<(), _, _>(index, None, None, false, false, (score, member.clone()))
                    .await,
            )?;
        }
        queue(pipeline.sadd::<(), _, _>(self.keys.names(), name).await)?;
        let _: Vec<Value> = self.note(pipeline.all().await)?;
        Ok(())
    }

    /// Drops `id` from both of its indexes where its score is `score` (mode `Equal`) or at
    /// most `score` (`AtMost`). Best effort: a failure only leaves a dead entry behind.
    async fn unindex(&self, id: Ulid, name: &str, score: &str, mode: DropMode) {
        let entry = [id.to_string(), score.to_owned()];
        let (all, by_name) = (self.keys.all_idx(), self.keys.name_idx(name));
        let (a, b) = tokio::join!(
            self.drop_entries(&all, &entry, mode),
            self.drop_entries(&by_name, &entry, mode),
        );
        if let Err(e) = a.and(b) {
            tracing::debug!(error = %e, %id, "index cleanup failed; the sweeper will finish it");
        }
    }

    /// After the record script: replaces the hint by the record's expiry in both indexes and
    /// drops the id from its previous name's index (only that version's entry). Best effort:
    /// the hint already keeps the record listed.
    async fn settle(
        &self,
        id: Ulid,
        name: &str,
        expires_at: Timestamp,
        hint: u64,
        previous: Option<(String, String)>,
    ) {
        let args = vec![
            id.to_string(),
            expires_at.as_millis().to_string(),
            hint.to_string(),
        ];
        let settle_in = |index: String| INDEX_SETTLE.run(&self.client, vec![index], args.clone());
        let old_index = async {
            match &previous {
                Some((old_name, old_expires)) => {
                    let entry = [id.to_string(), old_expires.clone()];
                    let index = self.keys.name_idx(old_name);
                    self.drop_entries(&index, &entry, DropMode::AtMost)
                        .await
                        .map(|_| ())
                }
                None => Ok(()),
            }
        };
        let (a, b, c) = tokio::join!(
            settle_in(self.keys.all_idx()),
            settle_in(self.keys.name_idx(name)),
            old_index,
        );
        let (a, b) = (self.note(a), self.note(b));
        let result = a.and(b).and(c);
        if let Err(e) = result {
            tracing::debug!(error = %e, %id, "index update after register failed; the hint stays");
        }
    }

    /// Fetches the records of `ids` in pipelined batches. Missing ones come back as `None`.
    async fn fetch(&self, ids: &[Ulid]) -> Result<Vec<Option<ServiceRecord>>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(BATCH) {
            let pipeline = self.client.pipeline();
            for id in chunk {
                queue(pipeline.get::<(), _>(self.keys.svc(*id)).await)?;
            }
            let replies: Vec<Value> = self.note(pipeline.all().await)?;
            if replies.len() != chunk.len() {
                return Err(StoreError::Corrupt(format!(
                    "pipeline of {} GET answered {} replies",
                    chunk.len(),
                    replies.len()
                )));
            }
            for (id, reply) in chunk.iter().zip(replies) {
                out.push(record_from_value(*id, &reply)?);
            }
        }
        Ok(out)
    }

    /// Reads every member of an index with its score.
    async fn read_index(&self, key: &str) -> Result<Vec<(String, f64)>, StoreError> {
        self.note(
            self.client
                .zrange(key, 0, -1, None, false, None, true)
                .await,
        )
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
            dropped += self.drop_entries(index, &args, DropMode::Equal).await?;
        }
        Ok(dropped)
    }

    /// Runs [`INDEX_DROP`] on `index` with flat `member, score` pairs.
    async fn drop_entries(
        &self,
        index: &str,
        pairs: &[String],
        mode: DropMode,
    ) -> Result<usize, StoreError> {
        let mut args = Vec::with_capacity(pairs.len() + 1);
        args.push(mode.arg().to_owned());
        args.extend_from_slice(pairs);
        let n = self.note(
            INDEX_DROP
                .run(&self.client, vec![index.to_owned()], args)
                .await,
        )?;
        Ok(usize::try_from(int_of(&n)?).unwrap_or(0))
    }

    /// Lists the live records of one index, dropping dead members from it in the background.
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
            // Cleanup is best effort and the listing is already correct: neither wait for it
            // nor fail because of it.
            let store = self.clone();
            let index = index.to_owned();
            tokio::spawn(async move {
                if let Err(e) = store.drop_from_index(&index, &dead).await {
                    tracing::debug!(error = %e, index, "index cleanup on read failed");
                }
            });
        }
        Ok(live)
    }

    /// Sweeps one index; returns how many entries were dropped. For a by-name index (`name`
    /// given) entries whose record now has another display name are dropped too.
    async fn sweep_index(
        &self,
        index: &str,
        name: Option<&str>,
        now: u64,
    ) -> Result<usize, StoreError> {
        let mut dropped = 0;
        loop {
            let candidates: Vec<(String, f64)> = self.note(
                self.client
                    .zrangebyscore(index, "-inf", now as f64, true, Some((0, BATCH as i64)))
                    .await,
            )?;
            if candidates.is_empty() {
                break;
            }
            let pipeline = self.client.pipeline();
            let mut checked = Vec::with_capacity(candidates.len());
            let mut dead = Vec::new();
            for (member, score) in &candidates {
                match Ulid::from_string(member) {
                    Ok(id) => {
                        queue(pipeline.get::<(), _>(self.keys.svc(id)).await)?;
                        checked.push((member.clone(), *score));
                    }
                    Err(_) => dead.push((member.clone(), *score)),
                }
            }
            let replies: Vec<Value> = if checked.is_empty() {
                Vec::new()
            } else {
                self.note(pipeline.all().await)?
            };
            if replies.len() != checked.len() {
                return Err(StoreError::Corrupt(format!(
                    "pipeline of {} GET answered {} replies",
                    checked.len(),
                    replies.len()
                )));
            }
            let mut progress = 0;
            let rescore = self.client.pipeline();
            let mut rescored = 0;
            for ((member, score), reply) in checked.into_iter().zip(replies) {
                let (expires, record_name) = expiry_and_name(&reply);
                let moved = matches!((name, record_name), (Some(n), Some(r)) if n != r);
                match expires {
                    Some(expires_at) if !moved => {
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
                    // Expired or renamed: a registration under this name in between changed
                    // the score with its hint, so the conditional drop keeps it.
                    _ => dead.push((member, score)),
                }
            }
            if rescored > 0 {
                let _: Vec<Value> = self.note(rescore.all().await)?;
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

    /// Sweeps the by-name indexes of `names`: one round trip finds the indexes with expired
    /// scores, only those are swept, then empty indexes are forgotten.
    async fn sweep_names(&self, names: &[String], now: u64) -> Result<usize, StoreError> {
        let pipeline = self.client.pipeline();
        for name in names {
            queue(
                pipeline
                    .zrangebyscore::<(), _, _, _>(
                        self.keys.name_idx(name),
                        "-inf",
                        now as f64,
                        false,
                        Some((0, 1)),
                    )
                    .await,
            )?;
        }
        let firsts: Vec<Value> = self.note(pipeline.all().await)?;
        if firsts.len() != names.len() {
            return Err(StoreError::Corrupt(format!(
                "pipeline of {} ZRANGEBYSCORE answered {} replies",
                names.len(),
                firsts.len()
            )));
        }
        let mut dropped = 0;
        for (name, first) in names.iter().zip(firsts) {
            if !is_empty_reply(&first) {
                dropped += self
                    .sweep_index(&self.keys.name_idx(name), Some(name), now)
                    .await?;
            }
        }
        self.forget_empty_names(names).await?;
        Ok(dropped)
    }

    /// Which of `names` have an empty by-name index (one pipelined round trip).
    async fn empty_names(&self, names: &[String]) -> Result<Vec<String>, StoreError> {
        let pipeline = self.client.pipeline();
        for name in names {
            queue(pipeline.zcard::<(), _>(self.keys.name_idx(name)).await)?;
        }
        let counts: Vec<Value> = self.note(pipeline.all().await)?;
        if counts.len() != names.len() {
            return Err(StoreError::Corrupt(format!(
                "pipeline of {} ZCARD answered {} replies",
                names.len(),
                counts.len()
            )));
        }
        let mut empty = Vec::new();
        for (name, count) in names.iter().zip(counts) {
            if int_of(&count)? == 0 {
                empty.push(name.clone());
            }
        }
        Ok(empty)
    }

    /// Removes names with an empty index from the names set.
    async fn forget_empty_names(&self, names: &[String]) -> Result<(), StoreError> {
        let empty = self.empty_names(names).await?;
        if empty.is_empty() {
            return Ok(());
        }
        let _: i64 = self.note(self.client.srem(self.keys.names(), empty.clone()).await)?;
        // A registration may have indexed a name between ZCARD and SREM: put it back.
        let still_empty = self.empty_names(&empty).await?;
        let refilled: Vec<String> = empty
            .into_iter()
            .filter(|name| !still_empty.contains(name))
            .collect();
        if !refilled.is_empty() {
            let _: i64 = self.note(self.client.sadd(self.keys.names(), refilled).await)?;
        }
        Ok(())
    }
}

/// TCP keepalive for the Valkey sockets, so an idle connection to a vanished peer is noticed.
fn keepalive() -> TcpKeepalive {
    let keepalive = TcpKeepalive::new().with_time(KEEPALIVE_IDLE);
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "freebsd",
        target_os = "windows"
    ))]
    let keepalive = keepalive.with_interval(KEEPALIVE_INTERVAL);
    keepalive
}

/// Logs connection changes: `valkey.connected` once per (re)connection and `valkey.disconnected`
/// once per outage (not for every failed reconnection attempt).
fn watch_connection(client: &Client, conn: &Arc<ConnState>) {
    {
        let conn = conn.clone();
        client.on_reconnect(move |server| {
            if !conn.up.swap(true, AtomicOrdering::SeqCst) {
                conn.reported.store(false, AtomicOrdering::SeqCst);
                tracing::info!(server = %server, detail = "connected to Valkey", "valkey.connected");
            }
            async { Ok(()) }
        });
    }
    {
        let conn = conn.clone();
        client.on_error(move |(error, server)| {
            let was_up = conn.up.swap(false, AtomicOrdering::SeqCst);
            if was_up || !conn.reported.swap(true, AtomicOrdering::SeqCst) {
                conn.reported.store(true, AtomicOrdering::SeqCst);
                let server = server.map(|s| s.to_string()).unwrap_or_default();
                tracing::warn!(server, error = %error, detail = "lost the connection to Valkey; reconnecting", "valkey.disconnected");
            } else {
                tracing::debug!(error = %error, "Valkey reconnection attempt failed");
            }
            async { Ok(()) }
        });
    }
    let conn = conn.clone();
    client.on_unresponsive(move |server| {
        if conn.up.swap(false, AtomicOrdering::SeqCst) {
            conn.reported.store(true, AtomicOrdering::SeqCst);
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
        // A script's verdict on a record that does not follow the layout.
        _ if e.details().starts_with("CORRUPT") => StoreError::Corrupt(e.to_string()),
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

/// The body of a record value, everything after the header (see `docs/valkey-store.md`): the URL
/// and the display name with their byte lengths, then the info JSON.
fn record_body(url: &str, name: &str, info_json: &str) -> String {
    format!("{}:{url}{}:{name}{info_json}", url.len(), name.len())
}

/// A record value split into its parts, borrowing from the value.
#[derive(Debug, Clone, PartialEq)]
struct RawRecord<'a> {
    registered_at: u64,
    last_updated: u64,
    last_ping_at: u64,
    expires_at: u64,
    url: &'a str,
    name: &'a str,
    info_json: &'a str,
}

impl<'a> RawRecord<'a> {
    /// Splits a record value; the error says what does not follow the layout. Never panics.
    fn parse(v: &'a [u8]) -> Result<RawRecord<'a>, String> {
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
        let (name, info) = length_prefixed(rest, "display name")?;
        let info_json = std::str::from_utf8(info).map_err(|e| format!("info is not UTF-8: {e}"))?;
        let [registered_at, last_updated, last_ping_at, expires_at] = stamps;
        Ok(RawRecord {
            registered_at,
            last_updated,
            last_ping_at,
            expires_at,
            url,
            name,
            info_json,
        })
    }

    fn into_record(self, id: Ulid) -> Result<ServiceRecord, StoreError> {
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
        })
    }
}

/// The `<len>:<text>` at the start of `v` and what follows it.
fn length_prefixed<'a>(v: &'a [u8], what: &str) -> Result<(&'a str, &'a [u8]), String> {
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
fn record_from_value(id: Ulid, v: &Value) -> Result<Option<ServiceRecord>, StoreError> {
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
fn expiry_and_name(reply: &Value) -> (Option<u64>, Option<&str>) {
    match reply.as_bytes().map(RawRecord::parse) {
        Some(Ok(raw)) => (Some(raw.expires_at), Some(raw.name)),
        _ => (None, None),
    }
}

/// Whether a reply is an empty (or nil) array.
fn is_empty_reply(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
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

    async fn list(&self, filter: &ListFilter) -> Result<Vec<ServiceRecord>, StoreError> {
        let mut records = if let Some(url) = &filter.url {
            let id: Option<String> = self.note(self.client.get(self.keys.url(url)).await)?;
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
        assert_eq!(keys.gone(id), format!("p:{{{tag}}}:gone:{id}"));
        assert_eq!(keys.name_idx("A"), "p:{n:A}:idx");
        assert_eq!(keys.all_idx(), "p:{all}:idx");
        assert_eq!(keys.names(), "p:{all}:names");
    }

    /// A whole record value as the register script writes it.
    fn value(stamps: [u64; 4], url: &str, name: &str, info_json: &str) -> Vec<u8> {
        let header: String = stamps.iter().map(|ms| format!("{ms:013}")).collect();
        format!("{header}{}", record_body(url, name, info_json)).into_bytes()
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
    fn scripts_use_the_documented_offsets() {
        // Lua is 1-based: the URL's length starts at byte HEADER_LEN + 1; ping rewrites
        // last_ping_at and expires_at from 0-based offset 2 * 13.
        let url_at = format!("field(v, {})", HEADER_LEN + 1);
        let old_url_at = format!("field(old, {})", HEADER_LEN + 1);
        assert!(REGISTER.lua.contains(&old_url_at));
        assert!(PING.lua.contains(&url_at));
        assert!(DEREGISTER.lua.contains(&url_at));
        assert!(PING.lua.contains(&format!(
            "redis.call('SETRANGE', KEYS[1], {}, stamps)",
            2 * STAMP_DIGITS
        )));
        assert!(PING
            .lua
            .contains(&format!("#stamps ~= {}", 2 * STAMP_DIGITS)));
        assert!(REGISTER.lua.contains(&format!("#header ~= {HEADER_LEN}")));
        assert!(REGISTER.lua.contains("string.format('%013.0f', ms)"));
        // Expiry must fit 13 digits for a long time with the longest TTL accepted.
        let latest = 9_999_999_999_999u64 - MAX_TTL.as_millis() as u64;
        assert!(latest > 4_000_000_000_000, "year 2096 at least");
    }

    #[test]
    fn scores_render_as_integers() {
        assert_eq!(score_text(1_761_566_430_123.0), "1761566430123");
    }
}
