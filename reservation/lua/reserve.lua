-- reserve: hold every item of a reservation, all or nothing; idempotent by reservation id.
-- KEYS[1] reservation record, KEYS[2] expiries zset, KEYS[3] holds counter,
-- KEYS[3+i] stock hash of item i
-- ARGV[1] reservation id, ARGV[2] ttl ms, ARGV[3] retention ms, ARGV[4] stock key prefix,
-- ARGV[5] items JSON (canonical), ARGV[5+i] quantity of item i (at most MAX_STOCK)
-- Returns expires_at (an integer) if it created the hold (the caller knows the items),
-- {kind, state, expires_at, items} with kind existing|conflict,
-- or {'unknown_sku', sku} / {'insufficient', sku, requested, available} /
-- {'corrupt', sku, available, held, sold}.
local res_key, expiries_key, holds_key = KEYS[1], KEYS[2], KEYS[3]
local id, stock_prefix, items_json = ARGV[1], ARGV[4], ARGV[5]
local retention = tonumber(ARGV[3])
local now = now_ms()

local state, expires_at, stored_items = decode_record(redis.call('GET', res_key))
if state then
  -- The id is known: report it, holding nothing more.
  if stored_items ~= items_json then
    -- Other items: the declared stock keys are not this record's, so touch nothing (a
    -- hold past its deadline is still reported as expired, like `reservation`).
    if state == 'held' and now >= expires_at then
      state = 'expired'
    end
    return {'conflict', state, expires_at, stored_items}
  end
  -- A hold past its deadline that the reaper has not reached yet expires now, so the
  -- answer never shows a dead hold. Its items are the declared ones.
  if state == 'held' and now >= expires_at then
    if not keys_match(4, #KEYS - 3, stock_prefix, items_json) then
      return redis.error_reply('reserve: the declared keys are not the items\' stock keys')
    end
    local corrupt = move_items(4, stored_items, 'available')
    if corrupt then
      return corrupt
    end
    finish(res_key, expiries_key, id, 'expired', expires_at, items_json, retention)
    count_holds(holds_key, -1)
    state = 'expired'
  end
  return {'existing', state, expires_at, stored_items}
end

local n = #KEYS - 3
local prefix_len = string.len(stock_prefix)
-- Validate every item first ...
for i = 1, n do
  local qty = tonumber(ARGV[5 + i])
  local sku = string.sub(KEYS[3 + i], prefix_len + 1)
  local level, raw = read_level(KEYS[3 + i])
  if level == nil then
    return {'unknown_sku', sku}
  end
  if level == false then
    return corrupt_reply(sku, raw)
  end
  if level[1] < qty then
    return {'insufficient', sku, qty, level[1]}
  end
end
-- ... then write (stock only moves from available to held: totals stay within limits),
-- the counter first: the one write that can fail (foreign data at its key) then fails
-- before the others.
count_holds(holds_key, 1)
for i = 1, n do
  local qty = tonumber(ARGV[5 + i])
  redis.call('HINCRBY', KEYS[3 + i], 'available', -qty)
  redis.call('HINCRBY', KEYS[3 + i], 'held', qty)
end
expires_at = now + tonumber(ARGV[2])
redis.call('SET', res_key, encode_record('held', expires_at, items_json))
redis.call('ZADD', expiries_key, expires_at, id)
return expires_at
