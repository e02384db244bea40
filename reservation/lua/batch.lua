-- batch: several reserve / confirm / release / expire calls of one namespace in one script,
-- applied in order, each with exactly the semantics of reserve.lua / settle.lua and its
-- own reply. Coalescing sends one of these instead of one script per call.
--
-- KEYS[1] expiries zset; then per entry: its reservation record, then the stock hash of
-- each of its items (in the canonical item order).
-- ARGV[1] retention ms, ARGV[2] stock key prefix, ARGV[3] number of entries; then per
-- entry: op (reserve|confirm|release|expire), reservation id, number of items n, ttl ms
-- (0 for a settlement), items JSON (canonical; for a settlement the items the client
-- read), then for a reserve the n quantities.
-- Returns one reply per entry, in order: a reserve's reply as reserve.lua, a settlement's
-- as settle.lua, or {'error', message} if that entry cannot be applied (foreign data
-- under the key prefix): the other entries are not affected.
--
-- Every key is read at most once per batch and written at most once, at its end: the
-- records with one MGET and one MSET (final ones with SET .. PX, for their retention),
-- the expiry index with one ZADD and one ZREM, each stock hash with one HMGET and one
-- HSET. In between every entry sees what the entries before it left, exactly as separate
-- scripts would; an entry changes the cached state only once it is sure to apply, so an
-- entry that fails changes nothing. Lua has no rollback, so the writes come last, the
-- expiry index first: the only one that can fail (a foreign key) then fails the batch
-- before anything is written.
local expiries_key = KEYS[1]
local retention = tonumber(ARGV[1])
local stock_prefix = ARGV[2]
local entries = tonumber(ARGV[3])
local now = now_ms()

-- Lua's unpack is limited to a few thousand values: bulk commands go in slices.
local SLICE = 1024

-- ---- reservation records -------------------------------------------------------------

-- key -> stored string or false (no record); foreign[key] = true for a key holding
-- something other than a string (an entry on it fails, nothing overwrites it).
local records, foreign = {}, {}
-- Written records, in order: key -> true, and key -> true if final (SET .. PX).
local record_keys, record_dirty, record_final = {}, {}, {}

do
  local res_keys, seen = {}, {}
  local k, a = 2, 4
  for _ = 1, entries do
    local key = KEYS[k]
    if not seen[key] then
      seen[key] = true
      res_keys[#res_keys + 1] = key
    end
    local n = tonumber(ARGV[a + 2])
    k = k + 1 + n
    a = a + 5
    if ARGV[a - 5] == 'reserve' then
      a = a + n
    end
  end
  local found = 0
  for first = 1, #res_keys, SLICE do
    local last = math.min(first + SLICE - 1, #res_keys)
    local values = redis.call('MGET', unpack(res_keys, first, last))
    for i = first, last do
      local value = values[i - first + 1]
      records[res_keys[i]] = value
      if value then
        found = found + 1
      end
    end
  end
  -- MGET reads a key of another type as missing: count the keys that exist, and only if
  -- some are not strings look for them one by one.
  local existing = 0
  for first = 1, #res_keys, SLICE do
    local last = math.min(first + SLICE - 1, #res_keys)
    existing = existing + redis.call('EXISTS', unpack(res_keys, first, last))
  end
  if existing > found then
    for _, key in ipairs(res_keys) do
      if not records[key] then
        local kind = redis.call('TYPE', key)
        foreign[key] = kind['ok'] ~= 'none'
      end
    end
  end
end

local function write_record(key, value, final)
  if not record_dirty[key] then
    record_dirty[key] = true
    record_keys[#record_keys + 1] = key
  end
  records[key] = value
  record_final[key] = final
end

-- Deadlines as text, formatted once per batch (calls of a batch mostly share a ttl).
local deadlines = {}
local function deadline_text(expires_at)
  local text = deadlines[expires_at]
  if not text then
    text = exact(expires_at)
    deadlines[expires_at] = text
  end
  return text
end

-- The expiry index: id -> deadline (text) to add, or false to remove (the last change
-- wins).
local index_ids, index_change = {}, {}
local function change_index(id, deadline)
  if index_change[id] == nil then
    index_ids[#index_ids + 1] = id
  end
  index_change[id] = deadline
end

-- ---- stock levels ----------------------------------------------------------------------

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

-- A reservation's final state: off the expiry index, kept for the retention period.
local function finish_entry(res_key, id, state, expires_at, items_json)
  write_record(res_key, encode_record(state, expires_at, items_json), true)
  change_index(id, false)
end

local WRONGTYPE = 'WRONGTYPE Operation against a key holding the wrong kind of value'

-- ---- entries ---------------------------------------------------------------------------

-- One reserve: KEYS[k] its reservation record, KEYS[k + 1 .. k + n] its stock hashes,
-- ARGV[q .. q + n - 1] its quantities.
local function reserve_entry(k, n, id, ttl, items_json, q)
  local res_key = KEYS[k]
  if foreign[res_key] then
    return {'error', WRONGTYPE}
  end
  local state, expires_at, stored_items = decode_record(records[res_key])
  if state then
    if stored_items ~= items_json then
      if state == 'held' and now >= expires_at then
        state = 'expired'
      end
      return {'conflict', state, expires_at, stored_items}
    end
    if state == 'held' and now >= expires_at then
      if not keys_match(k + 1, n, stock_prefix, items_json) then
        return {'error', 'reserve: the declared keys are not the items\' stock keys'}
      end
      local moves, corrupt = plan_moves(k + 1, stored_items, 'available')
      if not moves then
        return corrupt
      end
      finish_entry(res_key, id, 'expired', expires_at, stored_items)
      apply_moves(moves, 'available')
      state = 'expired'
    end
    return {'existing', state, expires_at, stored_items}
  end
  -- Validate every item first ...
  local qtys = {}
  for i = 1, n do
    local key = KEYS[k + i]
    local qty = tonumber(ARGV[q + i - 1])
    local level = level_at(key)
    if type(level) ~= 'table' or level[1] < qty then
      local sku = string.sub(key, string.len(stock_prefix) + 1)
      if level == 'unknown' then
        return {'unknown_sku', sku}
      end
      if level == 'corrupt' then
        return corrupt_reply(sku, raws[key])
      end
      return {'insufficient', sku, qty, level[1]}
    end
    qtys[i] = qty
  end
  -- ... then record the hold and move the (cached) stock.
  expires_at = now + ttl
  local deadline = deadline_text(expires_at)
  write_record(res_key, string.format('held:%s:%s', deadline, items_json), false)
  change_index(id, deadline)
  for i = 1, n do
    local key = KEYS[k + i]
    local level = levels[key]
    level[1] = level[1] - qtys[i]
    level[2] = level[2] + qtys[i]
    touch(key)
  end
  return expires_at
end

-- One settlement (as settle.lua): KEYS[k] its reservation record, KEYS[k + 1 .. k + n] the
-- stock hashes of the items the client read.
local function settle_entry(k, n, id, action, items_json)
  local res_key = KEYS[k]
  if foreign[res_key] then
    return {'error', WRONGTYPE}
  end
  local state, expires_at, stored_items = decode_record(records[res_key])
  if not state then
    change_index(id, false)
    return {'not_found'}
  end
  local changed = 0
  if state == 'held' then
    if stored_items ~= items_json or not keys_match(k + 1, n, stock_prefix, items_json) then
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
      local moves, corrupt = plan_moves(k + 1, stored_items, field)
      if not moves then
        return corrupt
      end
      finish_entry(res_key, id, to, expires_at, stored_items)
      apply_moves(moves, field)
      state, changed = to, 1
    end
  elseif action == 'expire' then
    change_index(id, false)
  end
  return {state, expires_at, stored_items, changed}
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
  local ok, reply
  if op == 'reserve' then
    ok, reply = pcall(reserve_entry, k, n, id, ttl, items_json, a + 5)
  else
    ok, reply = pcall(settle_entry, k, n, id, op, items_json)
  end
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

-- ---- writes, each key once -------------------------------------------------------------

local adds, removes = {}, {}
for _, id in ipairs(index_ids) do
  local deadline = index_change[id]
  if deadline then
    adds[#adds + 1] = deadline
    adds[#adds + 1] = id
  else
    removes[#removes + 1] = id
  end
end
for first = 1, #adds, SLICE do
  redis.call('ZADD', expiries_key, unpack(adds, first, math.min(first + SLICE - 1, #adds)))
end
for first = 1, #removes, SLICE do
  redis.call('ZREM', expiries_key, unpack(removes, first, math.min(first + SLICE - 1, #removes)))
end

local held = {}
for _, key in ipairs(record_keys) do
  if record_final[key] then
    redis.call('SET', key, records[key], 'PX', retention)
  else
    held[#held + 1] = key
    held[#held + 1] = records[key]
  end
end
for first = 1, #held, SLICE do
  redis.call('MSET', unpack(held, first, math.min(first + SLICE - 1, #held)))
end

-- Every stock level the batch changed (exact integers: see MAX_STOCK).
for _, key in ipairs(dirty) do
  local level = levels[key]
  redis.call('HSET', key, 'available', exact(level[1]), 'held', exact(level[2]), 'sold', exact(level[3]))
end
return replies
