-- Register: compare-and-set the URL key and write the record.
-- KEYS: url key, record key, tombstone (one slot).
-- ARGV: expected url-key value ('' = absent), id, url, record body (everything after the
-- header), ttl ms.
-- Returns {'retry'}, {'conflict'} or
-- {status, registered_at, now, expires_at, old name, old expires_at}.
local cur = redis.call('GET', KEYS[1])
if not cur then cur = '' end
if cur ~= ARGV[1] then return {'retry'} end
local old = redis.call('GET', KEYS[2])
local reg = nil
local old_name = false
local old_exp = false
if old then
  local url, p = field(old, HEADER_LEN + 1)
  local name = url and field(old, p)
  reg = stamp(old, 0)
  old_exp = stamp(old, 3)
  if not (name and reg and old_exp) then return malformed(KEYS[2]) end
  if url ~= ARGV[3] then return {'conflict'} end
  old_name = name
end
local now = server_now()
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
if #header ~= HEADER_LEN then
  return redis.error_reply('ERR expiry beyond ' .. STAMP_DIGITS .. ' digits')
end
redis.call('SET', KEYS[2], header .. ARGV[4], 'PX', ttl)
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
redis.call('DEL', KEYS[3])
if old_exp then old_exp = ms_text(old_exp) end
return {status, ms_text(reg), ms_text(now), ms_text(now + ttl), old_name, old_exp}
