-- One integration's shared breaker, half-open leases, retry budget and quota.
-- The same state machine as breaker.py's BreakerCell (keep them in step:
-- tests run the breaker suite against both). Atomic: Redis runs a script
-- alone, so a trip, a lease or a unit of quota is decided exactly once.
--
-- KEYS: 1 breaker hash, 2 half-open lease zset, 3 hourly quota, 4 daily quota
-- ARGV: 1 op (a acquire, r record, f flush, s snapshot, x reset, p publish policy)
--       2 now  3 mode  4 failure_threshold  5 failure_rate  6 slow_rate
--       7 window_size  8 minimum_calls  9 reset_timeout_s  10 half_open_max
--       11 success_threshold  12 retry budget % (-1 none)  13 hourly (-1)
--       14 daily (-1)  15 lease id  16 lease ttl s  17 key ttl s  18 is_retry
--       19 deferred successes  20 deferred successes that were retries
--       21 outcome (s f i)  22 slow  23 trial  24 by | mode  25 reason | revision
-- Returns {decision, reason, state, opened_at, revision, mode, transitions...};
-- a transition is 5 items: from, to, reason, at, by. Snapshot returns the
-- fields as a flat list in place of transitions.

local bk, lk, hk, dk = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op = ARGV[1]
local now = tonumber(ARGV[2])
local fthr, frate, srate = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local wsize, minc, rto = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local homax, sthr, budget = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local hlim, dlim = tonumber(ARGV[13]), tonumber(ARGV[14])
local lease, lease_ttl, key_ttl = ARGV[15], tonumber(ARGV[16]), tonumber(ARGV[17])
local is_retry = ARGV[18] == '1'

local f = redis.call('HMGET', bk, 'st', 'oa', 'ca', 'cf', 'cs', 'ring', 'pos', 'cnt', 'nf', 'ns', 'nr', 'mode', 'rev',
                    'rif')
local st = f[1] or 'closed'
local oa, ca = f[2] or '', f[3] or ''
local cf, cs = tonumber(f[4]) or 0, tonumber(f[5]) or 0
local ring, pos, cnt = f[6] or '', tonumber(f[7]) or 0, tonumber(f[8]) or 0
local nf, ns, nr = tonumber(f[9]) or 0, tonumber(f[10]) or 0, tonumber(f[11]) or 0
local mode = f[12] or ARGV[3]
local rev = f[13] or '0'
local rif = tonumber(f[14]) or 0  -- retries admitted, not yet recorded: they count against the budget now
local changed = false
local out = {}

local function reset_window()
  ring = string.rep('0', wsize)
  pos, cnt, nf, ns, nr = 0, 0, 0, 0, 0
  changed = true
end

if string.len(ring) ~= wsize then reset_window() end

local function move(to, reason, by)
  out[#out + 1] = st
  out[#out + 1] = to
  out[#out + 1] = reason
  out[#out + 1] = ARGV[2]
  out[#out + 1] = by or ''
  if to == 'open' then oa = ARGV[2] elseif to == 'closed' then oa = '' end
  st, ca, cf, cs, rif = to, ARGV[2], 0, 0, 0
  redis.call('DEL', lk)
  reset_window()
end

local function push(failed, slow, retry)
  if cnt == wsize then
    local old = tonumber(string.sub(ring, pos + 1, pos + 1))
    nf = nf - old % 2
    ns = ns - math.floor(old / 2) % 2
    nr = nr - math.floor(old / 4) % 2
  else
    cnt = cnt + 1
  end
  local bits = (failed and 1 or 0) + (slow and 2 or 0) + (retry and 4 or 0)
  ring = string.sub(ring, 1, pos) .. bits .. string.sub(ring, pos + 2)
  nf = nf + (failed and 1 or 0)
  ns = ns + (slow and 1 or 0)
  nr = nr + (retry and 1 or 0)
  pos = (pos + 1) % wsize
  changed = true
end

local function pct(n) return string.format('%.0f', 100 * n / cnt) end

local function record(outcome, slow, trial, retry)
  if retry and rif > 0 then
    rif = rif - 1
    changed = true
  end
  if outcome == 'i' then return end
  local failed = outcome == 'f'
  push(failed, slow, retry)
  if failed then cf, cs = cf + 1, 0 else cf, cs = 0, cs + 1 end
  if mode == 'forced_open' or mode == 'forced_closed' then return end
  if st == 'half_open' then
    if not (trial or mode == 'metrics_only') then return end
    if failed then
      move('open', 'trial call failed in half-open')
    elseif cs >= sthr then
      move('closed', cs .. ' consecutive successes in half-open')
    end
  elseif st == 'closed' then
    if cf >= fthr then
      move('open', cf .. ' consecutive failures')
    elseif cnt >= minc then
      if frate > 0 and nf * 100 >= frate * cnt then
        move('open', 'failure rate ' .. pct(nf) .. '% >= ' .. ARGV[5] .. '% over ' .. cnt .. ' calls')
      elseif srate > 0 and ns * 100 >= srate * cnt then
        move('open', 'slow call rate ' .. pct(ns) .. '% >= ' .. ARGV[6] .. '% over ' .. cnt .. ' calls')
      end
    end
  end
end

-- successes this process deferred ride on this round trip, before anything else
for _ = 1, tonumber(ARGV[19]) do record('s', false, false, false) end
for _ = 1, tonumber(ARGV[20]) do record('s', false, false, true) end

local decision, reason = 1, ''

if op == 'a' then
  if is_retry and budget >= 0 and cnt >= minc and
      (nr + rif + 1) * 100 > budget * math.min(cnt + rif + 1, wsize) then
    decision, reason = 0, 'budget'
  elseif mode == 'forced_open' then
    decision, reason = 0, 'forced'
  elseif mode ~= 'forced_closed' then
    if st == 'open' then
      if now - tonumber(oa) < rto then
        if mode ~= 'metrics_only' then decision, reason = 0, 'open' end
      else
        move('half_open', 'reset timeout elapsed')
      end
    end
    if st == 'half_open' and reason == '' then
      redis.call('ZREMRANGEBYSCORE', lk, '-inf', now)  -- leases of attempts that never reported back
      if redis.call('ZCARD', lk) >= homax then
        if mode ~= 'metrics_only' then decision, reason = 0, 'half_open' end
      else
        redis.call('ZADD', lk, now + lease_ttl, lease)
        redis.call('EXPIRE', lk, key_ttl)
        decision = 2
      end
    end
  end
  if decision ~= 0 and (hlim >= 0 or dlim >= 0) then
    local used = redis.call('MGET', hk, dk)
    local hourly, daily = tonumber(used[1]) or 0, tonumber(used[2]) or 0
    local full = (hlim >= 0 and hourly >= hlim and 'hourly') or (dlim >= 0 and daily >= dlim and 'daily') or nil
    if full then
      if decision == 2 then redis.call('ZREM', lk, lease) end
      decision, reason = 0, 'quota:' .. full
    else
      if redis.call('INCR', hk) == 1 then redis.call('EXPIRE', hk, 3600 + 60) end
      if redis.call('INCR', dk) == 1 then redis.call('EXPIRE', dk, 86400 + 60) end
    end
  end
  if decision ~= 0 and is_retry then
    rif = rif + 1
    changed = true
  end
elseif op == 'r' then
  if ARGV[23] == '1' then redis.call('ZREM', lk, lease) end
  record(ARGV[21], ARGV[22] == '1', ARGV[23] == '1', is_retry)
elseif op == 'x' then
  if st ~= 'closed' then
    move('closed', ARGV[25], ARGV[24])
  else
    cf, cs, ca = 0, 0, ARGV[2]
    redis.call('DEL', lk)
    reset_window()
  end
elseif op == 'p' then
  mode, rev = ARGV[24], ARGV[25]
  changed = true
end

if changed then
  redis.call('HSET', bk, 'st', st, 'oa', oa, 'ca', ca, 'cf', cf, 'cs', cs, 'ring', ring, 'pos', pos,
             'cnt', cnt, 'nf', nf, 'ns', ns, 'nr', nr, 'rev', rev, 'rif', rif)
  if f[12] or op == 'p' then redis.call('HSET', bk, 'mode', mode) end
  redis.call('EXPIRE', bk, key_ttl)
end

if op == 's' then
  local leases = redis.call('ZCOUNT', lk, now, '+inf')
  return {0, '', st, oa, rev, mode, {'st', st, 'oa', oa, 'ca', ca, 'cf', cf, 'cs', cs, 'cnt', cnt, 'nf', nf,
                               'ns', ns, 'nr', nr, 'mode', mode, 'leases', leases}}
end

local reply = {decision, reason, st, oa, rev, mode}
for i = 1, #out do reply[#reply + 1] = out[i] end
return reply
