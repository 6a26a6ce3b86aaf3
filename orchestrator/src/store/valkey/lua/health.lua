-- Set health: rewrite a live record's health field, keeping the rest of it and its TTL, if
-- the caller may (the lease rule of ping.lua).
-- KEYS: record key. ARGV: [1] the new health field ('' = the default health), [2] presented
-- lease hash ('' = none), [3] '1' for the admin key.
-- Returns nil for a missing record, a FORBIDDEN error for a leased one without its lease,
-- else {the new record value, 1 when the status changed else 0}.
local v = redis.call('GET', KEYS[1])
if not v then return false end
local lease = lease_of(v)
local start, health, check, info = extras_of(v)
if lease == nil or not start then return malformed(KEYS[1]) end
local old_status = status_of(health)
if not old_status then return malformed(KEYS[1]) end
if lease and ARGV[2] ~= lease and ARGV[3] ~= '1' then return forbidden() end
local new = string.sub(v, 1, start - 1) .. ARGV[1] .. check .. string.sub(v, info)
-- The key exists (time stands still inside a script); KEEPTTL leaves its expiry alone.
redis.call('SET', KEYS[1], new, 'KEEPTTL')
local changed = 0
if status_of(ARGV[1]) ~= old_status then changed = 1 end
return {new, changed}
