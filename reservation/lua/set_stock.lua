-- set_stock: set the available quantity of a SKU (creating it); held and sold are kept.
-- KEYS[1] stock hash; ARGV[1] available
-- Returns {available, held, sold}.
local key = KEYS[1]
redis.call('HSET', key, 'available', ARGV[1])
redis.call('HSETNX', key, 'held', 0)
redis.call('HSETNX', key, 'sold', 0)
local level = redis.call('HMGET', key, 'available', 'held', 'sold')
return {tonumber(level[1]), tonumber(level[2]), tonumber(level[3])}
