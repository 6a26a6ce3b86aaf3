-- Helpers for the record layout (docs/valkey-store.md), shared by the record scripts.
-- STAMP_DIGITS, HEADER_LEN and PING_OFFSET are defined by the prelude that scripts.rs renders
-- from the constants of record.rs and puts before this file.
local STAMP_PATTERN = '^' .. string.rep('%d', STAMP_DIGITS) .. '$'
local STAMP_FORMAT = '%0' .. STAMP_DIGITS .. '.0f'

-- The i-th header timestamp (0 = registered_at ... 3 = expires_at) as a number, nil when it is
-- not STAMP_DIGITS digits.
local function stamp(v, i)
  local s = string.sub(v, i * STAMP_DIGITS + 1, (i + 1) * STAMP_DIGITS)
  if not string.find(s, STAMP_PATTERN) then return nil end
  return tonumber(s)
end

-- ms as exactly STAMP_DIGITS zero-padded digits (longer only past the year 2286, which the
-- longest accepted TTL rules out; callers still check the length).
local function stamp_text(ms)
  return string.format(STAMP_FORMAT, ms)
end

-- ms as an integer text, never in exponent notation.
local function ms_text(ms)
  return string.format('%.0f', ms)
end

-- The server's time in ms.
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The length-prefixed text at byte p (1-based) and the position after it, nil when malformed.
local function field(v, p)
  local n, s = string.match(v, '^(%d+):()', p)
  if not n then return nil end
  local e = s + tonumber(n)
  if e - 1 > #v then return nil end
  return string.sub(v, s, e - 1), e
end

-- The error reply for a record that does not follow the layout (mapped to StoreError::Corrupt).
local function malformed(key)
  return redis.error_reply('CORRUPT servicekit record ' .. key .. ' does not follow the layout')
end


-- The lease hash of a record: the length-prefixed field between the display name and the info
-- JSON (which starts with '{'), present only on leased records. false when unleased, nil when
-- malformed.
local function lease_of(v)
  local _, p = field(v, HEADER_LEN + 1)
  if not p then return nil end
  local _, q = field(v, p)
  if not q then return nil end
  if not string.find(v, '^%d', q) then return false end
  return field(v, q)
end

-- The lease field of a record with lease hash h ('' = unleased).
local function lease_field(h)
  if h == '' then return '' end
  return #h .. ':' .. h
end

-- The error reply for a write of a leased record without its lease (StoreError::Forbidden).
local function forbidden()
  return redis.error_reply('FORBIDDEN the entry is leased')
end

-- The optional tagged fields after the lease (docs/valkey-store.md): where they start, the
-- whole health field and the whole check field ('' when absent), and where the info JSON
-- starts. nil when malformed.
local function extras_of(v)
  local _, p = field(v, HEADER_LEN + 1)
  if not p then return nil end
  local _, q = field(v, p)
  if not q then return nil end
  if string.find(v, '^%d', q) then
    _, q = field(v, q)
    if not q then return nil end
  end
  local start, health, check = q, '', ''
  if string.sub(v, q, q) == HEALTH_TAG then
    local _, r = field(v, q + 1)
    if not r then return nil end
    health, q = string.sub(v, q, r - 1), r
  end
  if string.sub(v, q, q) == CHECK_TAG then
    local _, r = field(v, q + 1)
    if not r then return nil end
    check, q = string.sub(v, q, r - 1), r
  end
  return start, health, check, q
end

-- The status letter of a whole health field ('' is the default health: passing), lower-case,
-- and whether the field is pending: its status change written but not yet known to be in the
-- change log (an upper-case letter; see health.lua).
local function status_of(health)
  if health == '' then return PASSING, false end
  local s = string.match(health, '^.%d+:()')
  if not s then return nil end
  local letter = string.sub(health, s, s)
  return string.lower(letter), letter ~= string.lower(letter)
end

-- A whole (non-empty) health field marked pending (upper-case status letter) or logged.
local function health_marked(health, pending)
  local s = string.match(health, '^.%d+:()')
  if not s then return health end
  local letter = string.lower(string.sub(health, s, s))
  if pending then letter = string.upper(letter) end
  return string.sub(health, 1, s - 1) .. letter .. string.sub(health, s + 1)
end
