-- Drop index entries whose score is still the one seen.
-- KEYS: one index. ARGV: mode, then id, score, id, score, ... Removes each id whose score is
-- still the one given (mode 'eq'), or at most the one given (mode 'le'). Returns the count.
local le = ARGV[1] == 'le'
local n = 0
for i = 2, #ARGV, 2 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s then
    s = tonumber(s)
    local limit = tonumber(ARGV[i + 1])
    if s == limit or (le and s < limit) then
      redis.call('ZREM', KEYS[1], ARGV[i])
      n = n + 1
    end
  end
end
return n
