-- Read the change log: where it stands, and up to a count of entries after a cursor.
-- KEYS: events stream. ARGV: [1] the cursor (MS-SEQ), [2] how many entries (0: none).
-- Returns false when the stream does not exist, else {last-generated-id,
-- max-deleted-entry-id, recorded-first-entry-id, 1 if entries were trimmed away else 0,
-- entries after the cursor, 1 if the stream holds the entry with exactly the cursor's id else
-- 0}; the caller decides whether the cursor lies in a gap (Rust compares ids exactly; Lua
-- numbers cannot). Trimmed: more entries were added than the stream holds (`MAXLEN ~` drops
-- whole nodes without updating max-deleted-entry-id). Held: a cursor the stream no longer
-- holds may name an entry a failover lost (docs/valkey-store.md, "A log that goes back").
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local last, deleted, first, added, length = false, false, false, 0, 0
for i = 1, #info, 2 do
  local k = info[i]
  if k == 'last-generated-id' then last = info[i + 1]
  elseif k == 'max-deleted-entry-id' then deleted = info[i + 1]
  elseif k == 'recorded-first-entry-id' then first = info[i + 1]
  elseif k == 'entries-added' then added = info[i + 1]
  elseif k == 'length' then length = info[i + 1] end
end
local entries = {}
if tonumber(ARGV[2]) > 0 then
  -- A cursor at the largest id has no exclusive successor: an error, read as no entries.
  local r = redis.pcall('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
  if not r.err then entries = r end
end
local trimmed = 0
if added > length then trimmed = 1 end
local held = 0
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) > 0 then held = 1 end
return {last, deleted, first, trimmed, entries, held}
