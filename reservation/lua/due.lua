-- due: up to ARGV[1] ids of holds whose deadline has passed (by the server's clock), for
-- the reaper to expire one by one with `settle`. Read-only.
-- KEYS[1] expiries zset
-- Returns the ids, earliest deadline first.
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
