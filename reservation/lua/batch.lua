-- batch: several reserve / confirm / release / expire calls of one namespace in one script,
-- applied in order, each with exactly the semantics of reserve.lua / settle.lua and its
-- own reply. Coalescing sends one of these instead of one script per call.
--
-- Calls of a batch mostly repeat the same operation, ttl and items (a hot SKU), so the
-- batch sends each distinct (op, ttl, items) once, as a "shape", and the calls as runs of
-- one shape: a call costs the server one key to parse (its record; the id is the key's
-- tail) instead of a dozen arguments.
--
-- KEYS[1] expiries zset, KEYS[2] holds counter, KEYS[3 .. 2 + s] the distinct stock hashes
-- of the batch, then one reservation record per call (in call order).
-- ARGV[1] retention ms, ARGV[2] stock key prefix, ARGV[3] s, ARGV[4] number of shapes,
-- ARGV[5] number of calls, ARGV[6] record key prefix (a call's id is its record key
-- without it); then per shape: op (reserve|confirm|release|expire), ttl ms (0 for a
-- settlement), items JSON (canonical; for a settlement the items the client read), number
-- of items n, then per item the position of its stock hash among the s (1-based) and its
-- quantity (0 for a settlement); then the number of runs, and per run its shape number
-- and how many consecutive calls (in call order) are of that shape.
-- Returns one reply per call, in order: a reserve's reply as reserve.lua, a settlement's
-- as settle.lua, or {'error', message} if that call cannot be applied (foreign data
-- under the key prefix): the other calls are not affected.
--
-- Every key is read at most once per batch and written at most once, at its end: the
-- records with one MGET and one MSET (final ones with SET .. PX, for their retention),
-- the expiry index with one ZADD and one ZREM, each stock hash with one HMGET and one
-- HSET. The holds a batch creates with one deadline are indexed as one member (a group,
-- see common.lua): one zset insert per batch instead of one per hold. In between every
-- call sees what the calls before it left, exactly as separate scripts would; a call
-- changes the cached state only once it is sure to apply, so a call that fails changes
-- nothing. Lua has no rollback, so the writes come last, the holds counter first and the
-- expiry index next: the only writes that can fail (foreign data at those keys) then fail
-- the batch before its records and stock are written.
local expiries_key, holds_key = KEYS[1], KEYS[2]
local retention = tonumber(ARGV[1])
local stock_prefix = ARGV[2]
local stock_count, shape_count, entries = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local record_prefix = ARGV[6]
local record_prefix_len = string.len(record_prefix)
local now = now_ms()

-- Lua's unpack is limited to a few thousand values: bulk commands go in slices.
local SLICE = 1024

-- ---- shapes ----------------------------------------------------------------------------

-- Each: op, ttl, items_json, n, key_at (the KEYS positions of its stock hashes), qtys.
local shapes = {}
local a = 7
for s = 1, shape_count do
  local n = tonumber(ARGV[a + 3])
  local shape = {op = ARGV[a], ttl = tonumber(ARGV[a + 1]), items_json = ARGV[a + 2], n = n, key_at = {}, qtys = {}}
  for i = 1, n do
    local at = tonumber(ARGV[a + 2 + 2 * i])
    if not at or at < 1 or at > stock_count then
      return redis.error_reply('batch: a stock key position out of range')
    end
    shape.key_at[i] = 2 + at
    shape.qtys[i] = tonumber(ARGV[a + 3 + 2 * i])
  end
  shapes[s] = shape
  a = a + 4 + 2 * n
end
local first_call_arg, first_record_key = a, 3 + stock_count

-- Whether a shape's declared stock keys are exactly its items' (checked once per shape).
local function shape_keys_match(shape)
  if shape.keys_match == nil then
    shape.keys_match = keys_match(shape.key_at, shape.n, stock_prefix, shape.items_json)
  end
  return shape.keys_match
end

-- ---- reservation records -------------------------------------------------------------

-- key -> stored string or false (no record); foreign[key] = true for a key holding
-- something other than a string (an entry on it fails, nothing overwrites it).
local records, foreign = {}, {}
-- Written records, in order: key -> true, and key -> true if final (SET .. PX).
local record_keys, record_dirty, record_final = {}, {}, {}

do
  -- A key named twice (one id called twice in a batch) is simply read twice.
  local last_record_key = first_record_key + entries - 1
  local found, existing = 0, 0
  for first = first_record_key, last_record_key, SLICE do
    local last = math.min(first + SLICE - 1, last_record_key)
    local values = redis.call('MGET', unpack(KEYS, first, last))
    for i = first, last do
      local value = values[i - first + 1]
      records[KEYS[i]] = value
      if value then
        found = found + 1
      end
    end
    -- MGET reads a key of another type as missing: count the keys that exist, and only
    -- if some are not strings look for them one by one.
    existing = existing + redis.call('EXISTS', unpack(KEYS, first, last))
  end
  if existing > found then
    for i = first_record_key, last_record_key do
      local key = KEYS[i]
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
-- wins); alone[id] = true for an id to index as its own member, not in a group.
local index_ids, index_change, alone = {}, {}, {}
local function change_index(id, deadline, own_member)
  if index_change[id] == nil then
    index_ids[#index_ids + 1] = id
  end
  index_change[id] = deadline
  alone[id] = own_member
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

-- Plans moving a shape's items from held to field `to`, as move_items does, without
-- writing: returns the moves, or nil and a 'corrupt' reply.
local function plan_moves(shape, to)
  if not shape.items then
    shape.items = cjson.decode(shape.items_json)
  end
  local items = shape.items
  local moves = {}
  for i = 1, #items, 2 do
    local key = KEYS[shape.key_at[(i + 1) / 2]]
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

-- Holds created minus holds ended by the batch (one INCRBY at the end).
local holds_change = 0

-- A reservation's final state: off the expiry index, kept for the retention period.
local function finish_entry(res_key, id, state, expires_at, items_json)
  write_record(res_key, encode_record(state, expires_at, items_json), true)
  change_index(id, false)
  holds_change = holds_change - 1
end

local WRONGTYPE = 'WRONGTYPE Operation against a key holding the wrong kind of value'

-- ---- calls -----------------------------------------------------------------------------

-- Whether every stock level of `shape` is read and holds its quantity: the common case
-- of a reserve, which the calls loop then applies without reserve_entry's steps (the
-- interpreter is most of a batch's cost).
local function can_hold(shape)
  local key_at, qtys = shape.key_at, shape.qtys
  for i = 1, shape.n do
    local level = levels[KEYS[key_at[i]]]
    if type(level) ~= 'table' or level[1] < qtys[i] then
      return false
    end
  end
  return true
end

-- Records a hold of `shape` on `res_key`, which has no record, and moves the (cached)
-- stock; every level is known to suffice. Every hold of a shape has the same deadline and
-- the same stored record.
local function record_hold(shape, res_key, id)
  if not shape.held_record then
    shape.expires_at = now + shape.ttl
    shape.deadline = deadline_text(shape.expires_at)
    shape.held_record = 'held:' .. shape.deadline .. ':' .. shape.items_json
  end
  write_record(res_key, shape.held_record, false)
  change_index(id, shape.deadline)
  holds_change = holds_change + 1
  local key_at, qtys = shape.key_at, shape.qtys
  for i = 1, shape.n do
    local key = KEYS[key_at[i]]
    local level = levels[key]
    level[1] = level[1] - qtys[i]
    level[2] = level[2] + qtys[i]
    touch(key)
  end
  return shape.expires_at
end

-- One reserve of `shape` (its items, quantities and ttl) on record `res_key`.
local function reserve_entry(shape, res_key, id)
  if foreign[res_key] then
    return {'error', WRONGTYPE}
  end
  local items_json = shape.items_json
  local state, expires_at, stored_items = decode_record(records[res_key])
  if state then
    if stored_items ~= items_json then
      if state == 'held' and now >= expires_at then
        state = 'expired'
      end
      return {'conflict', state, expires_at, stored_items}
    end
    if state == 'held' and now >= expires_at then
      if not shape_keys_match(shape) then
        return {'error', 'reserve: the declared keys are not the items\' stock keys'}
      end
      local moves, corrupt = plan_moves(shape, 'available')
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
  local n, key_at, qtys = shape.n, shape.key_at, shape.qtys
  for i = 1, n do
    local key = KEYS[key_at[i]]
    local qty = qtys[i]
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
  end
  return record_hold(shape, res_key, id)
end

-- One settlement (as settle.lua) of record `res_key`: `shape` holds the action and the
-- items the client read, with their stock keys.
local function settle_entry(shape, res_key, id)
  if foreign[res_key] then
    return {'error', WRONGTYPE}
  end
  local action = shape.op
  local state, expires_at, stored_items = decode_record(records[res_key])
  if not state then
    change_index(id, false)
    return {'not_found'}
  end
  local changed = 0
  if state == 'held' then
    if stored_items ~= shape.items_json or not shape_keys_match(shape) then
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
      local moves, corrupt = plan_moves(shape, field)
      if not moves then
        return corrupt
      end
      finish_entry(res_key, id, to, expires_at, stored_items)
      apply_moves(moves, field)
      state, changed = to, 1
    else
      -- The reaper found a hold that is not due (its id was reused after the group it
      -- was first indexed in): index it at its own deadline, as its own member, which
      -- replaces the one `due` left for it at the group's deadline.
      change_index(id, deadline_text(expires_at), true)
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

local runs, run_calls = tonumber(ARGV[first_call_arg]) or 0, 0
for r = 1, runs do
  local length = tonumber(ARGV[first_call_arg + 2 * r]) or 0
  if length < 1 then
    return redis.error_reply('batch: an empty run')
  end
  run_calls = run_calls + length
end
if run_calls ~= entries then
  return redis.error_reply('batch: the runs do not add up to the calls')
end

local replies = {}
local run_shape, run_left, run_at = nil, 0, first_call_arg + 1
for e = 1, entries do
  if run_left == 0 then
    run_shape = shapes[tonumber(ARGV[run_at])]
    run_left = tonumber(ARGV[run_at + 1])
    run_at = run_at + 2
  end
  run_left = run_left - 1
  local shape = run_shape
  local res_key = KEYS[first_record_key + e - 1]
  local id = string.sub(res_key, record_prefix_len + 1)
  local ok, reply
  if not shape then
    ok, reply = false, 'batch: a call of an unknown shape'
  elseif shape.op == 'reserve' then
    -- Reading a level can raise (foreign data): a reserve whose levels are not read yet
    -- goes to reserve_entry, under pcall.
    if records[res_key] == false and not foreign[res_key] and can_hold(shape) then
      ok, reply = true, record_hold(shape, res_key, id)
    else
      ok, reply = pcall(reserve_entry, shape, res_key, id)
    end
  else
    ok, reply = pcall(settle_entry, shape, res_key, id)
  end
  if not ok then
    reply = {'error', error_text(reply)}
  end
  replies[e] = reply
end

-- ---- writes, each key once -------------------------------------------------------------

-- Additions grouped by deadline: a deadline with one id indexes the id itself, one with
-- several ids one group member (see common.lua).
local groups, group_deadlines, removes, adds = {}, {}, {}, {}
for _, id in ipairs(index_ids) do
  local deadline = index_change[id]
  if deadline and alone[id] then
    adds[#adds + 1] = deadline
    adds[#adds + 1] = id
  elseif deadline then
    local group = groups[deadline]
    if not group then
      group = {}
      groups[deadline] = group
      group_deadlines[#group_deadlines + 1] = deadline
    end
    group[#group + 1] = id
  else
    removes[#removes + 1] = id
  end
end
for _, deadline in ipairs(group_deadlines) do
  adds[#adds + 1] = deadline
  adds[#adds + 1] = index_member(groups[deadline])
end
if holds_change ~= 0 then
  count_holds(holds_key, holds_change)
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
