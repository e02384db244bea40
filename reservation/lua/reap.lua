-- reap: expire up to ARGV[1] holds whose deadline has passed, returning their stock.
-- Bounded so one call never blocks the server for long; safe to run from many processes
-- at once (each script is atomic, and a reservation already settled is skipped).
-- KEYS[1] expiries zset
-- ARGV[1] batch size, ARGV[2] reservation key prefix, ARGV[3] stock key prefix,
-- ARGV[4] retention ms
-- Returns the number of holds expired.
local expiries_key = KEYS[1]
local res_prefix, stock_prefix = ARGV[2], ARGV[3]
local retention = tonumber(ARGV[4])
local now = now_ms()

local ids = redis.call('ZRANGEBYSCORE', expiries_key, '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local reaped = 0
for _, id in ipairs(ids) do
  local res_key = res_prefix .. id
  local stored = redis.call('HMGET', res_key, 'state', 'items', 'expires_at')
  if stored[1] == 'held' and now >= tonumber(stored[3]) then
    move_items(stock_prefix, stored[2], 'held', 'available')
    finish(res_key, expiries_key, id, 'expired', retention)
    reaped = reaped + 1
  else
    -- Settled by confirm/release in the meantime, or its record is gone.
    redis.call('ZREM', expiries_key, id)
  end
end
return reaped
