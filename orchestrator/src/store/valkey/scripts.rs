//! The Lua scripts: each operation that must be atomic is one script on one slot.

use fred::clients::Client;
use fred::error::Error as FredError;
use fred::interfaces::LuaInterface;
use fred::types::Value;
use tokio::sync::OnceCell;

/// A Lua script run with `EVALSHA`, loaded on first use and re-sent with `EVAL` whenever a
/// node answers `NOSCRIPT` (a restarted server, another Cluster node).
#[derive(Debug)]
pub(super) struct LuaScript {
    pub(super) lua: &'static str,
    sha: OnceCell<String>,
}

impl LuaScript {
    const fn new(lua: &'static str) -> Self {
        LuaScript {
            lua,
            sha: OnceCell::const_new(),
        }
    }

    pub(super) async fn run(
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

/// KEYS: url key, record key, tombstone. ARGV: expected url-key value ('' = absent), id, url,
/// record body ([`record_body`]: everything after the header), ttl ms.
/// Returns {'retry'}, {'conflict'} or {status, registered_at, now, expires_at, old name,
/// old expires_at}.
pub(super) static REGISTER: LuaScript = LuaScript::new(concat!(
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
pub(super) static PING: LuaScript = LuaScript::new(concat!(
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
pub(super) static DEREGISTER: LuaScript = LuaScript::new(concat!(
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
pub(super) static INDEX_DROP: LuaScript = LuaScript::new(
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
pub(super) static INDEX_SETTLE: LuaScript = LuaScript::new(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::valkey::record::{HEADER_LEN, STAMP_DIGITS};

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
    }
}
