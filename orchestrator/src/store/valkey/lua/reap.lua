-- Settle all-index entries whose record was seen gone, and re-score live ones.
-- KEYS: all-index, announced hash, events stream (one slot).
-- ARGV: [1] the log's MAXLEN, [2] '1' to drop only entries whose seen score has passed by the
-- server clock (a listing: a missing record with a later score is being deregistered, and
-- its deregistration logs it), [3] n, then n pairs (id, seen score) of entries whose record
-- was missing, then pairs (id, expires_at) of live records.
-- A gone entry is dropped only when its score is still the one seen (a later version's write
-- changed it); dropping it settles its announcement and logs `expired` with what the
-- announcement knew, so each announced id's removal is logged once, whoever drops it.
-- Live entries are raised to their record's expiry (ZADD XX GT), like the sweeper did.
-- Returns {dropped, logged, ids of live records the log never announced}.
local due = ARGV[2] == '1'
local now = due and server_now()
local n = tonumber(ARGV[3])
local dropped, logged = 0, 0
local last = 3 + 2 * n
for i = 4, last, 2 do
  local id, seen = ARGV[i], tonumber(ARGV[i + 1])
  local s = redis.call('ZSCORE', KEYS[1], id)
  if s and tonumber(s) == seen and not (due and seen > now) then
    redis.call('ZREM', KEYS[1], id)
    dropped = dropped + 1
    local cur = redis.call('HGET', KEYS[2], id)
    if cur then
      redis.call('HDEL', KEYS[2], id)
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*',
        'kind', 'expired', 'id', id, 'data', cur)
      logged = logged + 1
    end
  end
end
local unannounced = {}
for i = last + 1, #ARGV, 2 do
  local id = ARGV[i]
  redis.call('ZADD', KEYS[1], 'XX', 'GT', ARGV[i + 1], id)
  if redis.call('HEXISTS', KEYS[2], id) == 0 then unannounced[#unannounced + 1] = id end
end
return {dropped, logged, unannounced}
