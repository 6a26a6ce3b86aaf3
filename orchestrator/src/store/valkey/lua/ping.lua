-- Ping: refresh an existing record (never resurrect one) and its URL key.
-- KEYS: record key. ARGV: url key prefix (same slot), id, ttl ms.
-- Returns nil for a missing record, else {last_ping_at, expires_at}, plus the display name
-- when the caller should re-add the id to its indexes (see below).
local v = redis.call('GET', KEYS[1])
if not v then return false end
local url, p = field(v, HEADER_LEN + 1)
if not url then return malformed(KEYS[1]) end
local now = server_now()
local ttl = tonumber(ARGV[3])
-- Index repair (docs/valkey-store.md, "Index consistency"): the first ping after a register,
-- and the first in each later TTL period counted from it, return the name.
local updated, last = stamp(v, 1), stamp(v, 2)
local repair = false
if updated and last then
  repair = last <= updated
    or math.floor((now - updated) / ttl) > math.floor((last - updated) / ttl)
end
local stamps = stamp_text(now) .. stamp_text(now + ttl)
if #stamps ~= HEADER_LEN - PING_OFFSET then
  return redis.error_reply('ERR expiry beyond ' .. STAMP_DIGITS .. ' digits')
end
-- The key exists (time stands still inside a script), so SETRANGE cannot create one; it
-- keeps the TTL, which PEXPIRE then renews.
redis.call('SETRANGE', KEYS[1], PING_OFFSET, stamps)
redis.call('PEXPIRE', KEYS[1], ttl)
local ukey = ARGV[1] .. url
local cur = redis.call('GET', ukey)
if cur == ARGV[2] then
  redis.call('PEXPIRE', ukey, ttl)
elseif not cur then
  redis.call('SET', ukey, ARGV[2], 'PX', ttl)
end
if repair then
  local name = field(v, p)
  if name then return {ms_text(now), ms_text(now + ttl), name} end
end
return {ms_text(now), ms_text(now + ttl)}
