-- batch: several reserve / confirm / release / expire calls of one namespace in one script,
-- applied in order, each with exactly the semantics of reserve.lua / settle.lua and its
-- own reply. Coalescing sends one of these instead of one script per call.
--
-- KEYS[1] expiries zset; then per entry: its reservation hash, then the stock hash of each
-- of its items (in the canonical item order).
-- ARGV[1] retention ms, ARGV[2] stock key prefix, ARGV[3] number of entries; then per
-- entry: op (reserve|confirm|release|expire), reservation id, number of items n, ttl ms
-- (0 for a settlement), items JSON (canonical; for a settlement the items the client
-- read), then for a reserve the n quantities.
-- Returns one reply per entry, in order: a reserve's reply as reserve.lua, a settlement's
-- as settle.lua, or {'error', message} if a Redis command of that entry failed (foreign
-- data under the key prefix): the other entries are not affected.
--
-- Stock levels are read once per batch and written once at its end (a hot SKU costs one
-- HMGET and one HSET per batch, not per reservation); in between every entry sees the
-- levels the entries before it left, exactly as separate scripts would. An entry changes
-- the cached levels only after its own writes succeeded, so a failed entry moves no stock.
local expiries_key = KEYS[1]
local retention = tonumber(ARGV[1])
local stock_prefix = ARGV[2]
local entries = tonumber(ARGV[3])
local now = now_ms()

-- key -> {available, held, sold}, 'unknown' (no stock hash) or 'corrupt' (out of bounds).
local levels = {}
local raws = {}
local dirty, is_dirty = {}, {}

local function level_at(key)
  local level = levels[key]
  if level == nil then
    local read, raw = read_level(key)
    if read == nil then
      level = 'unknown'
    elseif read == false then
      level = 'corrupt'
      raws[key] = raw
    else
      level = read
    end
    levels[key] = level
  end
  return level
end

local function exact(n)
  return string.format('%.0f', n)
end

-- Plans moving a reservation's items (KEYS[first], ...) from held to field `to`, as
-- move_items does, without writing: returns the moves, or nil and a 'corrupt' reply.
local function plan_moves(first, items_json, to)
  local items = cjson.decode(items_json)
  local moves = {}
  for i = 1, #items, 2 do
    local key = KEYS[first + (i - 1) / 2]
    local qty = tonumber(items[i + 1])
    local level = level_at(key)
    if level == 'corrupt' then
      return nil, corrupt_reply(items[i], raws[key])
    end
    if level == 'unknown' then
      level = {0, 0, 0}
    end
    local unheld = math.min(level[2], qty)
    if level[1] + level[2] + level[3] - unheld + qty > MAX_STOCK then
      return nil, corrupt_reply(items[i], {exact(level[1]), exact(level[2]), exact(level[3])})
    end
    moves[#moves + 1] = {key, unheld, qty}
  end
  return moves
end

local function touch(key)
  if not is_dirty[key] then
    is_dirty[key] = true
    dirty[#dirty + 1] = key
  end
end

local FIELD = {available = 1, held = 2, sold = 3}

local function apply_moves(moves, to)
  for _, m in ipairs(moves) do
    local level = levels[m[1]]
    if type(level) ~= 'table' then
      level = {0, 0, 0}
      levels[m[1]] = level
    end
    level[2] = level[2] - m[2]
    level[FIELD[to]] = level[FIELD[to]] + m[3]
    touch(m[1])
  end
end

-- One reserve: KEYS[k] its reservation hash, KEYS[k + 1 .. k + n] its stock hashes,
-- ARGV[q .. q + n - 1] its quantities.
local function reserve_entry(k, n, id, ttl, items_json, q)
  local res_key = KEYS[k]
  local stored = redis.call('HMGET', res_key, 'state', 'items', 'expires_at')
  if stored[1] then
    local state, expires_at = stored[1], tonumber(stored[3])
    if stored[2] ~= items_json then
      if state == 'held' and now >= expires_at then
        state = 'expired'
      end
      return {'conflict', state, expires_at, stored[2]}
    end
    if state == 'held' and now >= expires_at then
      if not keys_match(k + 1, n, stock_prefix, items_json) then
        return {'error', 'reserve: the declared keys are not the items\' stock keys'}
      end
      local moves, corrupt = plan_moves(k + 1, stored[2], 'available')
      if not moves then
        return corrupt
      end
      finish(res_key, expiries_key, id, 'expired', retention)
      apply_moves(moves, 'available')
      state = 'expired'
    end
    return {'existing', state, expires_at, stored[2]}
  end
  local prefix_len = string.len(stock_prefix)
  -- Validate every item first ...
  for i = 1, n do
    local key = KEYS[k + i]
    local qty = tonumber(ARGV[q + i - 1])
    local sku = string.sub(key, prefix_len + 1)
    local level = level_at(key)
    if level == 'unknown' then
      return {'unknown_sku', sku}
    end
    if level == 'corrupt' then
      return corrupt_reply(sku, raws[key])
    end
    if level[1] < qty then
      return {'insufficient', sku, qty, level[1]}
    end
  end
  -- ... then write the record, and only then move the (cached) stock.
  local expires_at = now + ttl
  redis.call('ZADD', expiries_key, expires_at, id)
  redis.call('HSET', res_key, 'state', 'held', 'items', items_json, 'expires_at', expires_at)
  for i = 1, n do
    local level = levels[KEYS[k + i]]
    local qty = tonumber(ARGV[q + i - 1])
    level[1] = level[1] - qty
    level[2] = level[2] + qty
    touch(KEYS[k + i])
  end
  return {'created', 'held', expires_at}
end

-- One settlement (as settle.lua): KEYS[k] its reservation hash, KEYS[k + 1 .. k + n] the
-- stock hashes of the items the client read.
local function settle_entry(k, n, id, action, items_json)
  local res_key = KEYS[k]
  local stored = redis.call('HMGET', res_key, 'state', 'items', 'expires_at')
  local state = stored[1]
  if not state then
    redis.call('ZREM', expiries_key, id)
    return {'not_found'}
  end
  local expires_at = tonumber(stored[3])
  local changed = 0
  if state == 'held' then
    if stored[2] ~= items_json or not keys_match(k + 1, n, stock_prefix, items_json) then
      return {'items_changed'}
    end
    local to, field
    if now >= expires_at then
      to, field = 'expired', 'available'
    elseif action == 'confirm' then
      to, field = 'confirmed', 'sold'
    elseif action == 'release' then
      to, field = 'released', 'available'
    end
    if to then
      local moves, corrupt = plan_moves(k + 1, stored[2], field)
      if not moves then
        return corrupt
      end
      finish(res_key, expiries_key, id, to, retention)
      apply_moves(moves, field)
      state, changed = to, 1
    end
  elseif action == 'expire' then
    redis.call('ZREM', expiries_key, id)
  end
  return {state, expires_at, stored[2], changed}
end

local function error_text(e)
  if type(e) == 'table' then
    return tostring(e.err or 'error')
  end
  return tostring(e)
end

local replies = {}
local k, a = 2, 4
for e = 1, entries do
  local op, id, n, ttl, items_json = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), ARGV[a + 4]
  local ok, reply = pcall(function()
    if op == 'reserve' then
      return reserve_entry(k, n, id, ttl, items_json, a + 5)
    end
    return settle_entry(k, n, id, op, items_json)
  end)
  if not ok then
    reply = {'error', error_text(reply)}
  end
  replies[e] = reply
  k = k + 1 + n
  a = a + 5
  if op == 'reserve' then
    a = a + n
  end
end

-- Every stock level the batch changed, written once (exact integers: see MAX_STOCK).
for _, key in ipairs(dirty) do
  local level = levels[key]
  redis.call('HSET', key, 'available', exact(level[1]), 'held', exact(level[2]), 'sold', exact(level[3]))
end
return replies
