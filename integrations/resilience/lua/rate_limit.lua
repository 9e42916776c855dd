-- A sliding-window log: at most ARGV[3] requests in any ARGV[2] seconds.
-- KEYS: 1 the window's sorted set (member: a unique request id, score: when)
-- ARGV: 1 now  2 window seconds  3 limit  4 request id
-- Returns {allowed (1|0), remaining, reset_at}; a refused request is not counted.

local key = KEYS[1]
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
local allowed = 0
if count < limit then
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('PEXPIRE', key, math.ceil(window * 1000))
  count = count + 1
  allowed = 1
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
local reset_at = now + window
if oldest[2] then reset_at = tonumber(oldest[2]) + window end
return {allowed, limit - count, tostring(reset_at)}
