-- Health logged: once the change log has a status change's entry, mark the pending health
-- field health.lua wrote as logged (lower-case status letter), if the record still holds it
-- (a later report may have replaced it: then it is that report's to mark).
-- KEYS: record key. ARGV: [1] the pending health field as health.lua wrote it.
-- Returns 1 when marked, else 0.
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local start, health, check, info = extras_of(v)
if not start or health ~= ARGV[1] then return 0 end
local new = string.sub(v, 1, start - 1) .. health_marked(health, false) .. check
  .. string.sub(v, info)
redis.call('SET', KEYS[1], new, 'KEEPTTL')
return 1
