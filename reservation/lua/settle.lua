-- settle: ends a hold. `confirm` makes it a sale, `release` returns its stock, both
-- expiring it instead once its deadline has passed; `expire` (the reaper) returns its
-- stock only if the deadline has passed. A final reservation is reported unchanged.
-- The client reads the reservation's items first and declares their stock keys.
-- KEYS[1] reservation record, KEYS[2] expiries zset, KEYS[3] holds counter,
-- KEYS[3+i] stock hash of item i
-- ARGV[1] reservation id, ARGV[2] action (confirm|release|expire), ARGV[3] retention ms,
-- ARGV[4] stock key prefix, ARGV[5] the items JSON the client read (KEYS[4..] are theirs)
-- Returns {state, expires_at, items, changed} (changed = 1 if this call ended the hold),
-- {'not_found'}, {'items_changed'} (the record is not what the client read: read it
-- again and retry), or {'corrupt', sku, available, held, sold}.
local res_key, expiries_key, holds_key = KEYS[1], KEYS[2], KEYS[3]
local id, action, stock_prefix, items_json = ARGV[1], ARGV[2], ARGV[4], ARGV[5]
local retention = tonumber(ARGV[3])

local state, expires_at, stored_items = decode_record(redis.call('GET', res_key))
if not state then
  -- Nothing to settle; a deadline left in the index for it is dropped.
  redis.call('ZREM', expiries_key, id)
  return {'not_found'}
end
local changed = 0
if state == 'held' then
  -- Reservations never change their items, but the id may have been forgotten (after
  -- its retention) and reused since the client's read: then the declared keys are not
  -- this record's.
  if stored_items ~= items_json or not keys_match(4, #KEYS - 3, stock_prefix, items_json) then
    return {'items_changed'}
  end
  local due = now_ms() >= expires_at
  local to, field
  if due then
    to, field = 'expired', 'available'
  elseif action == 'confirm' then
    to, field = 'confirmed', 'sold'
  elseif action == 'release' then
    to, field = 'released', 'available'
  end
  if to then
    local corrupt = move_items(4, stored_items, field)
    if corrupt then
      return corrupt
    end
    finish(res_key, expiries_key, id, to, expires_at, stored_items, retention)
    count_holds(holds_key, -1)
    state, changed = to, 1
  elseif action == 'expire' then
    -- The reaper found a hold that is not due (its id was reused after the group it was
    -- first indexed in): index it at its own deadline.
    redis.call('ZADD', expiries_key, expires_at, id)
  end
elseif action == 'expire' then
  redis.call('ZREM', expiries_key, id)
end
return {state, expires_at, stored_items, changed}
