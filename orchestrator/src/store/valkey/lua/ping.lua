-- Ping: refresh an existing record (never resurrect one) and its URL key, if the caller may.
-- KEYS: record key. ARGV: url key prefix (same slot), id, ttl ms, presented lease hash
-- ('' = none), '1' for the admin key, url key ms (ttl + the binding's grace).
-- Returns nil for a missing record, a FORBIDDEN error for a leased one without its lease,
-- else {last_ping_at, expires_at}, plus the display name when the caller should re-add the
-- id to its indexes (see below).
local v = redis.call('GET', KEYS[1])
if not v then return false end
local url, p = field(v, HEADER_LEN + 1)
local lease = lease_of(v)
if not url or lease == nil then return malformed(KEYS[1]) end
if lease and ARGV[4] ~= lease and ARGV[5] ~= '1' then return forbidden() end
local now = server_now()
local ttl = tonumber(ARGV[3])
-- Index repair (docs/valkey-store.md, "Index consistency"): the first ping in each TTL
-- period after the register (counted from it) returns the name. Not the first ping after it:
-- the register itself indexed the record, and every new registration would pay for it.
local updated, last = stamp(v, 1), stamp(v, 2)
local repair = false
if updated and last then
  repair = math.floor((now - updated) / ttl) > math.floor((last - updated) / ttl)
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
  redis.call('PEXPIRE', ukey, ARGV[6])
elseif not cur then
  redis.call('SET', ukey, ARGV[2], 'PX', ARGV[6])
end
if repair then
  local name = field(v, p)
  if name then return {ms_text(now), ms_text(now + ttl), name} end
end
return {ms_text(now), ms_text(now + ttl)}
