-- Take one unit of an integration's hourly and daily quota, atomically.
-- The breaker's closed-state decision is the caller's (it saw it closed
-- moments ago); only the quota must be decided here, once for the fleet.
-- KEYS: 1 hourly counter, 2 daily counter
-- ARGV: 1 hourly limit (-1 none)  2 daily limit (-1 none)
-- Returns '' when the unit was taken, else the name of the full window
-- (a refused call takes nothing: its increments are undone).

local hlim, dlim = tonumber(ARGV[1]), tonumber(ARGV[2])
local hourly = redis.call('INCR', KEYS[1])
if hourly == 1 then redis.call('EXPIRE', KEYS[1], 3600 + 60) end
if hlim >= 0 and hourly > hlim then
  redis.call('DECR', KEYS[1])
  return 'hourly'
end
local daily = redis.call('INCR', KEYS[2])
if daily == 1 then redis.call('EXPIRE', KEYS[2], 86400 + 60) end
if dlim >= 0 and daily > dlim then
  redis.call('DECR', KEYS[1])
  redis.call('DECR', KEYS[2])
  return 'daily'
end
return ''
