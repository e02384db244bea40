-- adjust_stock: add a (possibly negative) delta to the available quantity of a known SKU,
-- refusing to go below zero.
-- KEYS[1] stock hash; ARGV[1] delta; ARGV[2] sku
-- Returns {'ok', available, held, sold}, {'unknown_sku', sku} or
-- {'insufficient', sku, requested, available}.
local key = KEYS[1]
local delta = tonumber(ARGV[1])
local available = tonumber(redis.call('HGET', key, 'available'))
if not available then
  return {'unknown_sku', ARGV[2]}
end
if available + delta < 0 then
  return {'insufficient', ARGV[2], -delta, available}
end
redis.call('HINCRBY', key, 'available', delta)
local level = redis.call('HMGET', key, 'available', 'held', 'sold')
return {'ok', tonumber(level[1]), tonumber(level[2]), tonumber(level[3])}
