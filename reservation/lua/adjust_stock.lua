-- adjust_stock: add a (possibly negative) delta to the available quantity of a known SKU,
-- refusing to go below zero or to take the total above MAX_STOCK.
-- KEYS[1] stock hash; ARGV[1] delta (within +-2^53, so exact); ARGV[2] sku
-- Returns {'ok', available, held, sold}, {'unknown_sku'}, {'insufficient', available},
-- {'limit', available, held, sold} or {'corrupt', sku, available, held, sold}.
local key = KEYS[1]
local delta = tonumber(ARGV[1])
local level, raw = read_level(key)
if level == nil then
  return {'unknown_sku'}
end
if level == false then
  return corrupt_reply(ARGV[2], raw)
end
local available, held, sold = level[1], level[2], level[3]
if available + delta < 0 then
  return {'insufficient', available}
end
if available + delta > MAX_STOCK - held - sold then
  return {'limit', available, held, sold}
end
redis.call('HINCRBY', key, 'available', delta)
return {'ok', available + delta, held, sold}
