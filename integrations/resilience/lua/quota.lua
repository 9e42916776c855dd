-- Take one unit of an integration's hourly and daily quota, atomically.
-- The breaker's closed-state decision is the caller's (it saw it closed
-- moments ago); only the quota must be decided here, once for the fleet.
-- Python builds the arguments and decodes the reply in lua_api.py only, by
-- the names below (tests/test_lua_api.py checks that they agree).
--
-- KEYS (state.lua's last two: the same hash tag {name}, one slot)
--   1 hourly_quota  counter of this hour's window
--   2 daily_quota   counter of this day's window
-- ARGV
--   1 hourly_limit  -1: none
--   2 daily_limit   -1: none
-- Reply: '' when the unit was taken, else the name of the full window
-- (hourly | daily; a refused call takes nothing: its increments are undone).

local ARG_NAMES = {'hourly_limit', 'daily_limit'}
if #ARGV ~= #ARG_NAMES then
  return redis.error_reply('quota.lua takes ' .. #ARG_NAMES .. ' arguments, got ' .. #ARGV)
end
local arg = {}
for i, name in ipairs(ARG_NAMES) do arg[name] = ARGV[i] end

local hlim, dlim = tonumber(arg.hourly_limit), tonumber(arg.daily_limit)
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
