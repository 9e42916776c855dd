-- A sliding-window log: at most ARGV[3] requests in any ARGV[2] seconds, with leases.
-- KEYS: 1 the window's sorted set (member: a request id, score: when it was counted)
-- ARGV: 1 now  2 window seconds  3 limit  4 an id for this call
--       5 '1': count this request against the limit; '0': only settle a lease
--       6 the lease to settle ('' for none)  7 its size  8 how many of it were used
--       9 how big a new lease is wanted (0: none)  10 the share divisor
-- A lease is `size` members "<id>:<i>" counted at once for a process to spend on its own.
-- Settling one counts its used members again at now (never earlier than they were spent)
-- and drops the unused ones. A new lease is at most (limit - count) / divisor: near the limit
-- every request is counted here one by one, and leases never let the total pass the limit.
-- Returns {allowed (1|0), remaining (the new lease not spent), reset_at, lease granted}.
-- A refused request is not counted.

local key = KEYS[1]
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local settled, size, used = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
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
if ARGV[5] == '1' and count < limit then
  redis.call('ZADD', key, now, ARGV[4])
  count = count + 1
  allowed = 1
end
local remaining = limit - count
local granted = 0
local wanted = tonumber(ARGV[9])
if wanted > 0 and (ARGV[5] == '0' or allowed == 1) then
  granted = math.min(wanted, math.floor(remaining / tonumber(ARGV[10])))
  if granted > 0 then
    local lease = {}
    for i = 1, granted do
      lease[#lease + 1] = now
      lease[#lease + 1] = ARGV[4] .. ':' .. i
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
