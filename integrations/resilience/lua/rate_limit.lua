-- A sliding-window log: at most `limit` requests in any `window_s` seconds, with leases.
-- Python builds the arguments and decodes the reply in lua_api.py only, by the names
-- below (tests/integrations/test_lua_api.py checks that they agree); rate_limit.LeaseBook sizes leases.
--
-- KEYS
--   1 window  the window's sorted set (member: a request id, score: when it was counted)
-- ARGV
--   1 now
--   2 window_s
--   3 limit
--   4 call_id       this call's id: the request's member, and the new lease's members' prefix
--   5 count         1: count this request against the limit; 0: only settle a lease
--   6 settle_id     the lease to settle ('' for none)
--   7 settle_size   its size
--   8 settle_used   how many of it were spent
--   9 lease_wanted  how big a new lease is wanted (0: none)
--  10 lease_share   a new lease is at most (limit - count) / lease_share
-- Reply
--   1 allowed    1 | 0 (a refused request is not counted)
--   2 remaining  left under the limit, the new lease not spent
--   3 reset_at   when the oldest counted request leaves the window
--   4 granted    the new lease's size (0: none)
-- A lease is `size` members "<id>:<i>" counted at once for a process to spend on its own.
-- Settling one counts its used members again at now (never earlier than they were spent)
-- and drops the unused ones. A new lease is at most (limit - count) / lease_share: near the
-- limit every request is counted here one by one, and leases never let the total pass the limit.

local ARG_NAMES = {'now', 'window_s', 'limit', 'call_id', 'count', 'settle_id', 'settle_size', 'settle_used',
                   'lease_wanted', 'lease_share'}
if #ARGV ~= #ARG_NAMES then
  return redis.error_reply('rate_limit.lua takes ' .. #ARG_NAMES .. ' arguments, got ' .. #ARGV)
end
local arg = {}
for i, name in ipairs(ARG_NAMES) do arg[name] = ARGV[i] end

local key = KEYS[1]
local now, window, limit = tonumber(arg.now), tonumber(arg.window_s), tonumber(arg.limit)
local settled, size, used = arg.settle_id, tonumber(arg.settle_size), tonumber(arg.settle_used)
if settled ~= '' and size > 0 then
  if used < size then
    local unused = {}
    for i = used + 1, size do unused[#unused + 1] = settled .. ':' .. i end
    redis.call('ZREM', key, unpack(unused))
  end
  if used > 0 then
    local spent = {}
    for i = 1, used do
      spent[#spent + 1] = now
      spent[#spent + 1] = settled .. ':' .. i
    end
    redis.call('ZADD', key, unpack(spent))
  end
end
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
local allowed = 0
if arg.count == '1' and count < limit then
  redis.call('ZADD', key, now, arg.call_id)
  count = count + 1
  allowed = 1
end
local remaining = limit - count
local granted = 0
local wanted = tonumber(arg.lease_wanted)
if wanted > 0 and (arg.count == '0' or allowed == 1) then
  granted = math.min(wanted, math.floor(remaining / tonumber(arg.lease_share)))
  if granted > 0 then
    local lease = {}
    for i = 1, granted do
      lease[#lease + 1] = now
      lease[#lease + 1] = arg.call_id .. ':' .. i
    end
    redis.call('ZADD', key, unpack(lease))
  end
end
if allowed == 1 or granted > 0 or used > 0 then
  redis.call('PEXPIRE', key, math.ceil(window * 1000))
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
local reset_at = now + window
if oldest[2] then reset_at = tonumber(oldest[2]) + window end
return {allowed, remaining, tostring(reset_at), granted}
