-- Checkers: say that one health-checker replica is alive until the server's now + ttl, forget
-- the replicas whose deadline has passed, and answer the live ones.
-- KEYS: the checkers sorted set (the all-index's slot), members scored by their deadline.
-- ARGV: [1] replica id, [2] ttl ms.
-- Returns the live replica ids, in no particular order. The set expires with its latest
-- deadline, so it goes away once no replica announces itself.
local now = server_now()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms_text(now))
redis.call('ZADD', KEYS[1], ms_text(now + tonumber(ARGV[2])), ARGV[1])
local latest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], ms_text(tonumber(latest[2])))
return redis.call('ZRANGE', KEYS[1], 0, -1)
