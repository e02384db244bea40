-- Shared helpers, prepended to every script of eventful-reservation (see src/redis/scripts.rs).
--
-- Key layout (all keys of one namespace share the hash tag `{<namespace>}`, hence one
-- Redis Cluster slot):
--   <prefix>{<ns>}:stock:<sku>  hash  available, held, sold
--   <prefix>{<ns>}:res:<id>     hash  state (held|confirmed|released|expired), items, expires_at
--   <prefix>{<ns>}:expiries     zset  reservation id scored by its deadline (unix ms)
-- `items` is a JSON array of strings: sku1, qty1, sku2, qty2, ... (sorted by sku).
--
-- Lua has no rollback: every script validates everything first and writes second.

-- Server time in unix milliseconds, so the clients' clocks never matter.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Moves the quantities of a reservation's items from field `from` to field `to` of each
-- stock hash (held -> available on release/expiry, held -> sold on confirm).
local function move_items(stock_prefix, items_json, from, to)
  local items = cjson.decode(items_json)
  for i = 1, #items, 2 do
    local key = stock_prefix .. items[i]
    local qty = tonumber(items[i + 1])
    redis.call('HINCRBY', key, from, -qty)
    redis.call('HINCRBY', key, to, qty)
  end
end

-- Puts a reservation in its final state: off the expiry index, kept for `retention_ms`
-- so that retries still see the outcome.
local function finish(res_key, expiries_key, id, state, retention_ms)
  redis.call('HSET', res_key, 'state', state)
  redis.call('ZREM', expiries_key, id)
  redis.call('PEXPIRE', res_key, retention_ms)
end

