-- Shared helpers, prepended to every script of eventful-reservation (see src/redis/scripts.rs).
--
-- Key layout (all keys of one namespace share the hash tag `{<namespace>}`, hence one
-- Redis Cluster slot):
--   <prefix>{<ns>}:stock:<sku>  hash  available, held, sold
--   <prefix>{<ns>}:res:<id>     string  <state>:<expires_at>:<items>, state one of
--                               held|confirmed|released|expired, expires_at in unix ms
--   <prefix>{<ns>}:expiries     zset  the ids of holds scored by their deadline (unix ms):
--                               a member is one id, or a group of the ids a batch held
--                               with one deadline (see index_member)
--   <prefix>{<ns>}:holds        string  the number of holds (not yet final)
-- `items` is a JSON array of strings: sku1, qty1, sku2, qty2, ... (sorted by sku).
-- A record is a string (not a hash) so that a batch reads all its records with one MGET
-- and writes them with one MSET.
--
-- Every key a script touches is declared in KEYS (never built from stored data): Redis
-- Cluster checks declared keys before the script runs, but an undeclared key only when
-- the script reaches it, after its earlier writes (e.g. mid slot migration).
--
-- Lua has no rollback: every script validates everything first and writes second.

-- The largest total (available + held + sold) of one SKU: 2^53 - 1, so every quantity
-- and every sum of them is exact in a Lua double and fits HINCRBY's int64.
local MAX_STOCK = 9007199254740991

-- Server time in unix milliseconds, so the clients' clocks never matter.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A whole number as Redis stores it (no exponent: every count here is below 2^53).
local function exact(n)
  return string.format('%.0f', n)
end

-- A reservation record's stored form.
local function encode_record(state, expires_at, items_json)
  return string.format('%s:%.0f:%s', state, expires_at, items_json)
end

-- A stored record: its state, expires_at (number) and items JSON; nil if there is none.
-- Anything else (not written by these scripts) raises an error.
local function decode_record(raw)
  if not raw then
    return nil
  end
  local state, expires_at, items_json = string.match(raw, '^(%l+):(%d+):(.*)$')
  if not state then
    error('not a reservation record')
  end
  return state, tonumber(expires_at), items_json
end

-- A stored count: a decimal integer in [0, MAX_STOCK] (a missing field is 0), else nil.
local function count(raw)
  if not raw then
    return 0
  end
  if not string.match(raw, '^%d+$') or string.len(raw) > 16 then
    return nil
  end
  local n = tonumber(raw)
  if n > MAX_STOCK then
    return nil
  end
  return n
end

-- Reads a stock hash. Returns nil if the SKU is unknown (no `available`), the level
-- {available, held, sold} if it is within the limits, or false and the raw fields if not
-- (data written before MAX_STOCK existed, or by hand): such a SKU is refused, not
-- half-updated.
local function read_level(key)
  local raw = redis.call('HMGET', key, 'available', 'held', 'sold')
  if not raw[1] then
    return nil
  end
  local available, held, sold = count(raw[1]), count(raw[2]), count(raw[3])
  if available and held and sold and available <= MAX_STOCK - held - sold then
    return {available, held, sold}
  end
  return false, raw
end

-- The reply for a SKU whose stored level is out of bounds.
local function corrupt_reply(sku, raw)
  return {'corrupt', sku, raw[1] or '0', raw[2] or '0', raw[3] or '0'}
end

-- Whether `n` declared keys are exactly the stock keys of `items_json`'s SKUs, in order
-- (the client declares them from the same canonical list). `at` is the KEYS position of
-- the first (the others follow it), or a table of the position of each (a batch declares
-- each stock key once for all its calls).
local function keys_match(at, n, stock_prefix, items_json)
  local ok, items = pcall(cjson.decode, items_json)
  if not ok or type(items) ~= 'table' or n ~= #items / 2 then
    return false
  end
  local listed = type(at) == 'table'
  for i = 1, #items, 2 do
    local position = listed and at[(i + 1) / 2] or at + (i - 1) / 2
    if KEYS[position] ~= stock_prefix .. items[i] then
      return false
    end
  end
  return true
end

-- Moves the quantities of a reservation's items from `held` to field `to` of their stock
-- hashes KEYS[first], KEYS[first + 1], ... (to `available` on release/expiry, to `sold`
-- on confirm). Checks every level first; returns a 'corrupt' reply and writes nothing if
-- one is out of bounds, else nil. `held` never goes below zero (a stock hash deleted by
-- hand while held is recreated with the returned quantities), as in the in-memory store.
local function move_items(first, items_json, to)
  local items = cjson.decode(items_json)
  local moves = {}
  for i = 1, #items, 2 do
    local key = KEYS[first + (i - 1) / 2]
    local qty = tonumber(items[i + 1])
    local level, raw = read_level(key)
    if level == false then
      return corrupt_reply(items[i], raw)
    end
    level = level or {0, 0, 0}
    local unheld = math.min(level[2], qty)
    if level[1] + level[2] + level[3] - unheld + qty > MAX_STOCK then
      return corrupt_reply(items[i], redis.call('HMGET', key, 'available', 'held', 'sold'))
    end
    moves[#moves + 1] = {key, unheld, qty}
  end
  for _, m in ipairs(moves) do
    redis.call('HINCRBY', m[1], 'held', -m[2])
    redis.call('HINCRBY', m[1], to, m[3])
  end
  return nil
end

-- The expiry index member of the ids indexed at one deadline: the id itself, or for
-- several ids a group, each id preceded by a NUL byte (reservation ids never contain
-- NUL). A group is not rewritten when one of its holds ends: `due` splits a group that
-- falls due into its ids, and the reaper then settles each (a final one is dropped).
local function index_member(ids)
  if #ids == 1 then
    return ids[1]
  end
  return '\0' .. table.concat(ids, '\0')
end

-- Adds `change` to the holds counter at `key`, never going below zero (holds made before
-- the counter existed end without having been counted).
local function count_holds(key, change)
  if redis.call('INCRBY', key, change) < 0 then
    redis.call('SET', key, 0)
  end
end

-- Puts a reservation in its final state: off the expiry index, kept for `retention_ms`
-- so that retries still see the outcome.
local function finish(res_key, expiries_key, id, state, expires_at, items_json, retention_ms)
  redis.call('SET', res_key, encode_record(state, expires_at, items_json), 'PX', retention_ms)
  redis.call('ZREM', expiries_key, id)
end

