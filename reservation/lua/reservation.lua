-- reservation: read a reservation, reporting a hold past its deadline as expired even
-- before the reaper has returned its stock. Read-only.
-- KEYS[1] reservation hash
-- Returns {state, expires_at, items} or {'not_found'}.
local stored = redis.call('HMGET', KEYS[1], 'state', 'items', 'expires_at')
local state = stored[1]
if not state then
  return {'not_found'}
end
local expires_at = tonumber(stored[3])
if state == 'held' and now_ms() >= expires_at then
  state = 'expired'
end
return {state, expires_at, stored[2]}
