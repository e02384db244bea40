-- due: up to ARGV[1] ids of holds whose deadline has passed (by the server's clock), for
-- the reaper to expire one by one with `settle`. A due group (see index_member) is split
-- into its ids, each indexed alone at the group's deadline, so that settling an id drops
-- it from the index as for a hold indexed alone, and ids past the limit wait there for the
-- next call.
-- KEYS[1] expiries zset
-- Returns the ids, earliest deadline first.
local SLICE = 1024
local limit = tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'WITHSCORES', 'LIMIT', 0, limit)
local ids = {}
for i = 1, #due, 2 do
  if #ids >= limit then
    break
  end
  local member, deadline = due[i], due[i + 1]
  if string.byte(member, 1) == 0 then
    local adds = {}
    for id in string.gmatch(member, '%z([^%z]+)') do
      adds[#adds + 1] = deadline
      adds[#adds + 1] = id
      if #ids < limit then
        ids[#ids + 1] = id
      end
    end
    redis.call('ZREM', KEYS[1], member)
    -- GT: an id indexed again at a later deadline (reused since) keeps that one.
    for first = 1, #adds, SLICE do
      redis.call('ZADD', KEYS[1], 'GT', unpack(adds, first, math.min(first + SLICE - 1, #adds)))
    end
  else
    ids[#ids + 1] = member
  end
end
return ids
