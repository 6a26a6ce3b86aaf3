-- Set health: rewrite a live record's health field, keeping the rest of it and its TTL, if
-- the caller may (the lease rule of ping.lua).
-- KEYS: record key. ARGV: [1] the new health field ('' = the default health), [2] presented
-- lease hash ('' = none), [3] '1' for the admin key.
-- A change of status is written *pending* (status letter upper-case) until health_logged.lua
-- marks it logged once the change log has its entry; a report of the same status on a
-- pending field counts as a change again, so an entry lost to a failed append is logged by
-- the next report. (The default health, '', has no letter to mark: a change to it is written
-- logged.)
-- A report of the status and output the record has (and not pending) writes nothing:
-- `checked_at` says when they were last set, and a pushed report comes with every ping.
-- Returns nil for a missing record, a FORBIDDEN error for a leased one without its lease,
-- else {the new record value, 1 when the status changed (or was pending) else 0, the health
-- field written}.
local v = redis.call('GET', KEYS[1])
if not v then return false end
local lease = lease_of(v)
local start, health, check, info = extras_of(v)
if lease == nil or not start then return malformed(KEYS[1]) end
local old_status, pending = status_of(health)
if not old_status then return malformed(KEYS[1]) end
if lease and ARGV[2] ~= lease and ARGV[3] ~= '1' then return forbidden() end
local field = ARGV[1]
local function output_of(h)
  if h == '' then return '' end
  return string.match(h, '^.%d+:.%d*:(.*)$')
end
if not pending and status_of(field) == old_status and output_of(field) == output_of(health) then
  return {v, 0, health}
end
local changed = 0
if status_of(field) ~= old_status or pending then
  changed = 1
  if field ~= '' then field = health_marked(field, true) end
end
local new = string.sub(v, 1, start - 1) .. field .. check .. string.sub(v, info)
-- The key exists (time stands still inside a script); KEEPTTL leaves its expiry alone.
redis.call('SET', KEYS[1], new, 'KEEPTTL')
return {new, changed, field}
