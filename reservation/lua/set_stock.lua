-- set_stock: set the available quantity of a SKU (creating it); held and sold are kept.
-- Refused if available + held + sold would exceed MAX_STOCK.
-- KEYS[1] stock hash; ARGV[1] available (a decimal u64, possibly above MAX_STOCK)
-- Returns {'ok', available, held, sold}, {'limit', held, sold} or
-- {'corrupt', sku, available, held, sold} (ARGV[2] sku).
local key = KEYS[1]
local raw = redis.call('HMGET', key, 'available', 'held', 'sold')
local held, sold = count(raw[2]), count(raw[3])
if not held or not sold or held > MAX_STOCK - sold then
  return corrupt_reply(ARGV[2], raw)
end
-- Exact up to MAX_STOCK; a larger request rounds to a double that is still larger.
local available = tonumber(ARGV[1])
if available > MAX_STOCK - held - sold then
  return {'limit', held, sold}
end
redis.call('HSET', key, 'available', ARGV[1], 'held', held, 'sold', sold)
return {'ok', available, held, sold}
