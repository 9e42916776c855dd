-- Take units of an integration's hourly and daily quota, atomically: one for
-- this call, and a lease of more for this process to spend on its own.
-- The breaker's closed-state decision is the caller's (it saw it closed
-- moments ago); only the quota must be decided here, once for the fleet.
-- Python builds the arguments and decodes the reply in lua_api.py only, by
-- the names below (tests/integrations/test_lua_api.py checks that they agree); the lease's
-- size is rate_limit.LeaseBook's, as for the inbound rate limiter.
--
-- KEYS (state.lua's last two: the same hash tag {name}, one slot)
--   1 hourly_quota  counter of this hour's window
--   2 daily_quota   counter of this day's window
-- ARGV
--   1 hourly_limit  -1: none
--   2 daily_limit   -1: none
--   3 count         1: take a unit for this call; 0: only give back
--   4 give_back     unspent units of a lease taken earlier in these windows
--   5 lease_wanted  how big a lease is wanted (0: none)
--   6 lease_share   a lease is at most (limit - count) / lease_share, in each limited window
-- Reply
--   1 full     '' when this call's unit was taken (or none asked), else the full window
--              (hourly | daily; a refused call takes nothing: its increments are undone)
--   2 granted  the lease's size (0: none): units taken in both windows ahead
-- A lease never lets either counter pass its limit, and near the limit (fewer
-- than lease_share left) every unit is taken here one by one.

local ARG_NAMES = {'hourly_limit', 'daily_limit', 'count', 'give_back', 'lease_wanted', 'lease_share'}
if #ARGV ~= #ARG_NAMES then
  return redis.error_reply('quota.lua takes ' .. #ARG_NAMES .. ' arguments, got ' .. #ARGV)
end
local arg = {}
for i, name in ipairs(ARG_NAMES) do arg[name] = ARGV[i] end

local limits = {tonumber(arg.hourly_limit), tonumber(arg.daily_limit)}
local names = {'hourly', 'daily'}
local ttls = {3600 + 60, 86400 + 60}

local function add(i, n)
  local value = redis.call('INCRBY', KEYS[i], n)
  if value == n then redis.call('EXPIRE', KEYS[i], ttls[i]) end
  return value
end

-- Unspent units go back to counters that still exist (an expired window is gone, and so is its count).
local give_back = tonumber(arg.give_back)
if give_back > 0 then
  for i = 1, 2 do
    local value = tonumber(redis.call('GET', KEYS[i]) or '-1')
    if value > 0 then redis.call('DECRBY', KEYS[i], math.min(give_back, value)) end
  end
end

local full = ''
local counts = {}
if arg.count == '1' then
  for i = 1, 2 do
    counts[i] = add(i, 1)
    if limits[i] >= 0 and counts[i] > limits[i] then
      for j = 1, i do redis.call('DECRBY', KEYS[j], 1) end
      return {names[i], 0}
    end
  end
else
  for i = 1, 2 do counts[i] = tonumber(redis.call('GET', KEYS[i]) or '0') end
end

local granted = tonumber(arg.lease_wanted)
if granted > 0 then
  for i = 1, 2 do
    if limits[i] >= 0 then
      granted = math.min(granted, math.floor((limits[i] - counts[i]) / tonumber(arg.lease_share)))
    end
  end
  if granted > 0 then
    for i = 1, 2 do add(i, granted) end
  else
    granted = 0
  end
end
return {full, granted}
