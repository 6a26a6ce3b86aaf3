-- Register: compare-and-set the URL key and write the record, if the caller may.
-- KEYS: url key, record key, tombstone (one slot).
-- ARGV: [1] expected url-key value ('' = absent), [2] id, [3] url, [4] record head (URL and
-- display name, length-prefixed), [5] ttl ms, [6] info JSON, [7] '1' when the id is one the
-- client proposed, [8] presented lease hash ('' = none), [9] hash of a new lease ('' = no
-- lease asked for), [10] '1' for the admin key, [11] url key ms (ttl + the binding's grace),
-- [12] the check field ('' = no check).
-- A live entry keeps its health field when its check field is ARGV[12] (the health a check
-- found belongs to that check), else its check is replaced and its health is the default (no
-- field), as a new entry's.
-- Returns {'retry'}, {'conflict'}, {'unbound'}, a FORBIDDEN error, or
-- {status, registered_at, now, expires_at, old name, old expires_at, lease outcome,
-- health field}.
local cur = redis.call('GET', KEYS[1])
if not cur then cur = '' end
if cur ~= ARGV[1] then return {'retry'} end
local old = redis.call('GET', KEYS[2])
local reg = nil
local old_name = false
local old_exp = false
local held = false
local health = ''
if old then
  local url, p = field(old, HEADER_LEN + 1)
  local name = url and field(old, p)
  reg = stamp(old, 0)
  old_exp = stamp(old, 3)
  held = lease_of(old)
  local start, check
  start, health, check = extras_of(old)
  if not (name and reg and old_exp and start) or held == nil then return malformed(KEYS[2]) end
  if check ~= ARGV[12] then health = '' end
  if url ~= ARGV[3] then return {'conflict'} end
  old_name = name
end
local gone = redis.call('GET', KEYS[3])
-- A proposed id is bound to this URL by its live record, else only by its tombstone: no
-- other URL can claim it (store/mod.rs docs).
if ARGV[7] == '1' and not old then
  if not gone or string.sub(gone, STAMP_DIGITS + 1) ~= ARGV[3] then return {'unbound'} end
end
-- The lease rule of LeaseOutcome::decide (store/mod.rs).
local lease = ''
local outcome = 'none'
if held then
  if ARGV[8] == held then
    lease, outcome = held, 'kept'
  elseif ARGV[10] == '1' and ARGV[9] ~= '' then
    lease, outcome = ARGV[9], 'new'
  elseif ARGV[10] == '1' then
    lease, outcome = held, 'held'
  else
    return forbidden()
  end
elseif ARGV[9] ~= '' then
  lease, outcome = ARGV[9], 'new'
end
local now = server_now()
local ttl = tonumber(ARGV[5])
-- Expire later than any earlier version of this id (replaced or deregistered), even in the
-- same millisecond: index removals compare scores with those versions' expires_at.
local floor = old_exp or 0
local gone_exp = (gone and stamp(gone, 0)) or 0
if gone_exp > floor then floor = gone_exp end
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
redis.call('SET', KEYS[2], header .. ARGV[4] .. lease_field(lease) .. health .. ARGV[12] .. ARGV[6],
  'PX', ttl)
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[11])
redis.call('DEL', KEYS[3])
if old_exp then old_exp = ms_text(old_exp) end
return {status, ms_text(reg), ms_text(now), ms_text(now + ttl), old_name, old_exp, outcome,
  health}
