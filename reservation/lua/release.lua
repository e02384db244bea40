-- release: a hold gives its stock back (if its deadline has passed it expires instead,
-- with the same effect on stock).
-- KEYS[1] reservation hash, KEYS[2] expiries zset
-- ARGV[1] reservation id, ARGV[2] retention ms, ARGV[3] stock key prefix
-- Returns {state, expires_at, items} after the call, or {'not_found'}.
local res_key, expiries_key = KEYS[1], KEYS[2]
local id, stock_prefix = ARGV[1], ARGV[3]
local retention = tonumber(ARGV[2])

local stored = redis.call('HMGET', res_key, 'state', 'items', 'expires_at')
local state = stored[1]
if not state then
  return {'not_found'}
end
local expires_at = tonumber(stored[3])
if state == 'held' then
  move_items(stock_prefix, stored[2], 'held', 'available')
  if now_ms() >= expires_at then
    state = 'expired'
  else
    state = 'released'
  end
  finish(res_key, expiries_key, id, state, retention)
end
return {state, expires_at, stored[2]}
