-- Deregister: delete the record, leave its tombstone, drop its URL key if still ours; only
-- if the caller may.
-- KEYS: record key, tombstone. ARGV: url key prefix (same slot), id, tombstone ms (the
-- binding grace, at least the ttl), presented lease hash ('' = none), '1' for the admin key.
-- Returns nil for a missing record, a FORBIDDEN error for a leased one without its lease,
-- else the record's value. A malformed record is deleted too (its URL key and tombstone only
-- as far as they can be read from it).
local v = redis.call('GET', KEYS[1])
if not v then return false end
local lease = lease_of(v)
if lease and ARGV[4] ~= lease and ARGV[5] ~= '1' then return forbidden() end
redis.call('DEL', KEYS[1])
local url = field(v, HEADER_LEN + 1)
-- A re-registration must expire later than this record did (see register.lua). The tombstone
-- also keeps the id bound to its URL: `expires_at` in the header width, then the URL.
local exp = stamp(v, 3)
if exp then redis.call('SET', KEYS[2], stamp_text(exp) .. (url or ''), 'PX', ARGV[3]) end
if url then
  local ukey = ARGV[1] .. url
  if redis.call('GET', ukey) == ARGV[2] then redis.call('DEL', ukey) end
end
return v
