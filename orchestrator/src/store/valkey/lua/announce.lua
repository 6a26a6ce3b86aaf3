-- Announce a version of an entry in the change log: `registered` when the log has not
-- announced the id (or logged its removal since), else `updated`.
-- KEYS: all-index, announced hash, events stream (one slot).
-- ARGV: [1] id, [2] the version's expires_at (STAMP_DIGITS digits), [3] url and display name
-- (length-prefixed, as in the record), [4] the record JSON, [5] the log's MAXLEN, [6] '1' for
-- a change within one version (a new health status: the record changed, its expiry did not).
-- Returns the new entry's id, or false when the announced version is later (a slower write
-- of an older version), or is this one and ARGV[6] is not '1' (a repair that lost to its
-- register).
-- Also raises the id's all-index score to the version's expiry, in the same step: an announced
-- id is always in the index, so the reaper (reap.lua) finds it once its record is gone.
local exp = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'GT', exp, ARGV[1])
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if cur then
  local version = stamp(cur, 0)
  if version and (version > exp or (version == exp and ARGV[6] ~= '1')) then return false end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ARGV[3])
local kind = 'registered'
if cur then kind = 'updated' end
return redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*',
  'kind', kind, 'id', ARGV[1], 'data', ARGV[4])
