-- reservation: read a reservation, reporting a hold past its deadline as expired even
-- before the reaper has returned its stock. Read-only.
-- KEYS[1] reservation record
-- Returns {state, expires_at, items} or {'not_found'}.
local state, expires_at, items_json = decode_record(redis.call('GET', KEYS[1]))
if not state then
  return {'not_found'}
end
if state == 'held' and now_ms() >= expires_at then
  state = 'expired'
end
return {state, expires_at, items_json}
