-- Deregister: delete the record, leave its tombstone, drop its URL key if still ours.
-- KEYS: record key, tombstone. ARGV: url key prefix (same slot), id, ttl ms.
-- Returns nil for a missing record, else the record's value. A malformed record is deleted
-- too (its URL key and tombstone only as far as they can be read from it).
local v = redis.call('GET', KEYS[1])
if not v then return false end
redis.call('DEL', KEYS[1])
-- A re-registration must expire later than this record did (see register.lua).
local exp = stamp(v, 3)
if exp then redis.call('SET', KEYS[2], ms_text(exp), 'PX', ARGV[3]) end
local url = field(v, HEADER_LEN + 1)
if url then
  local ukey = ARGV[1] .. url
  if redis.call('GET', ukey) == ARGV[2] then redis.call('DEL', ukey) end
end
return v
