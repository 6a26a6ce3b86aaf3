-- Settle a register's index entry: replace its hint by the record's expiry.
-- KEYS: one index. ARGV: id, expires_at, the caller's hint score. Sets the id's score to
-- expires_at unless a higher score other than the caller's own hint is there (a newer
-- registration's hint or expiry), so a late caller never lowers a newer score.
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s then
  s = tonumber(s)
  if s ~= tonumber(ARGV[3]) and s >= tonumber(ARGV[2]) then return 0 end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
