-- Read the change log: where it stands, and up to a count of entries after a cursor.
-- KEYS: events stream. ARGV: [1] the cursor (MS-SEQ), [2] how many entries (0: none).
-- Returns false when the stream does not exist, else {last-generated-id,
-- max-deleted-entry-id, recorded-first-entry-id, entries after the cursor}; the caller
-- decides whether the cursor lies in a gap (Rust compares ids exactly; Lua numbers cannot).
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local last, deleted, first = false, false, false
for i = 1, #info, 2 do
  local k = info[i]
  if k == 'last-generated-id' then last = info[i + 1]
  elseif k == 'max-deleted-entry-id' then deleted = info[i + 1]
  elseif k == 'recorded-first-entry-id' then first = info[i + 1] end
end
local entries = {}
if tonumber(ARGV[2]) > 0 then
  -- A cursor at the largest id has no exclusive successor: an error, read as no entries.
  local r = redis.pcall('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
  if not r.err then entries = r end
end
return {last, deleted, first, entries}
