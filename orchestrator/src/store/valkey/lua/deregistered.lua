-- Log a deregistration: drop the deleted version's all-index entry and, if the log announced
-- that version (or an older one), settle the announcement and log `deregistered`.
-- KEYS: all-index, announced hash, events stream (one slot).
-- ARGV: [1] id, [2] the deleted record's expires_at, [3] its JSON, [4] the log's MAXLEN.
-- Returns the new entry's id, or false when there was nothing to log: another step logged
-- the removal already (a reaper, a listing), or a later version of the id is announced (a
-- re-registration that raced with us: its `updated` stands, and its own removal comes later).
local exp = tonumber(ARGV[2])
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
-- Only this version's entry: a later version scores higher (index rules, docs).
if s and tonumber(s) <= exp then redis.call('ZREM', KEYS[1], ARGV[1]) end
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if not cur then return false end
local version = stamp(cur, 0)
if version and version > exp then return false end
redis.call('HDEL', KEYS[2], ARGV[1])
return redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*',
  'kind', 'deregistered', 'id', ARGV[1], 'data', ARGV[3])
