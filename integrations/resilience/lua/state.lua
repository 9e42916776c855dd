-- One integration's shared breaker, half-open leases, retry budget and quota.
-- The same state machine as breaker.py's BreakerCell (keep them in step:
-- tests run the breaker suite against both). Atomic: Redis runs a script
-- alone, so a trip, a lease or a unit of quota is decided exactly once.
-- Python builds the arguments and decodes the reply in lua_api.py only, by
-- the names below (tests/integrations/test_lua_api.py checks that they agree).
--
-- KEYS (one integration's, one hash tag {name}: one Redis Cluster slot)
--   1 breaker       hash: state, counts, window (a count window's ring or a time window's buckets), mode,
--                   policy revision
--   2 probe_leases  sorted set of half-open probe leases, scored by expiry
--   3 hourly_quota  counter of this hour's window
--   4 daily_quota   counter of this day's window
-- ARGV (by name in `arg` below; a limit of -1 means none)
--   1 op                        acquire | record | flush | snapshot | reset | publish
--   2 now                       wall time, s
--   3 mode                      the policy's; the one published to the hash wins
--   4 failure_threshold
--   5 failure_rate_threshold    %, 0: off
--   6 slow_call_rate_threshold  %, 0: off
--   7 window_size               a count window's calls
--   8 window_duration_s         a time window's seconds; 0: a count window
--   9 minimum_calls
--  10 reset_timeout_s
--  11 half_open_max_calls
--  12 success_threshold
--  13 retry_budget_percent      -1: none
--  14 hourly_limit              -1: none
--  15 daily_limit               -1: none
--  16 revision                  the policy's (publish writes it)
--  17 lease                     this attempt's probe lease id (acquire takes it, record releases it)
--  18 lease_ttl_s               a probe lease lapses after this
--  19 key_ttl_s                 state idle this long is forgotten
--  20 is_retry                  1 | 0
--  21 deferred_successes        fast successes of first attempts, recorded before the op
--  22 deferred_retry_successes  the same for retries
--  23 deferred_at               when the first of them was recorded: a time window counts them in its bucket
--  24 outcome                   record: success | failure | ignored
--  25 slow                      record: 1 | 0
--  26 trial                     record: 1 | 0, the attempt held a probe lease
--  27 by                        reset: the operator ('' for none)
--  28 reason                    reset: why
-- Ops: acquire (may an attempt go? takes a probe lease in half-open and a unit
-- of quota), record (an outcome; releases its lease), flush (nothing but the
-- deferred successes, which every op records first), snapshot (the counts),
-- reset (close, clear the window), publish (a saved policy's mode and revision).
-- Reply
--   1 decision     acquire: admit | trial (admitted, holding a probe lease) | refuse; admit otherwise
--   2 reason       refuse: budget | forced | open | half_open | quota:hourly | quota:daily; '' otherwise
--   3 state        the breaker after the op: closed | open | half_open
--   4 opened_at    '' unless open
--   5 revision     the policy revision last published
--   6 mode         the mode in force
--   7 transitions  what the op caused: a list of {from_state, to_state, reason, at, by}
--   8 counts       snapshot: {changed_at, consecutive_failures, consecutive_successes,
--                  half_open_in_flight, window_calls, window_failures, window_slow,
--                  window_retries}; {} otherwise

local ARG_NAMES = {'op', 'now', 'mode', 'failure_threshold', 'failure_rate_threshold', 'slow_call_rate_threshold',
                   'window_size', 'window_duration_s', 'minimum_calls', 'reset_timeout_s', 'half_open_max_calls',
                   'success_threshold', 'retry_budget_percent', 'hourly_limit', 'daily_limit', 'revision', 'lease',
                   'lease_ttl_s', 'key_ttl_s', 'is_retry', 'deferred_successes', 'deferred_retry_successes',
                   'deferred_at', 'outcome', 'slow', 'trial', 'by', 'reason'}
if #ARGV ~= #ARG_NAMES then
  return redis.error_reply('state.lua takes ' .. #ARG_NAMES .. ' arguments, got ' .. #ARGV)
end
local arg = {}
for i, name in ipairs(ARG_NAMES) do arg[name] = ARGV[i] end

local bk, lk, hk, dk = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op = arg.op
local OPS = {acquire = true, record = true, flush = true, snapshot = true, reset = true, publish = true}
if not OPS[op] then return redis.error_reply('state.lua has no op ' .. op) end
local now = tonumber(arg.now)
local fthr, frate, srate = tonumber(arg.failure_threshold), tonumber(arg.failure_rate_threshold),
                           tonumber(arg.slow_call_rate_threshold)
local wsize, minc, rto = tonumber(arg.window_size), tonumber(arg.minimum_calls), tonumber(arg.reset_timeout_s)
local wdur = tonumber(arg.window_duration_s)
local timed = wdur > 0
local homax, sthr = tonumber(arg.half_open_max_calls), tonumber(arg.success_threshold)
local budget = tonumber(arg.retry_budget_percent)
local hlim, dlim = tonumber(arg.hourly_limit), tonumber(arg.daily_limit)
local lease, lease_ttl, key_ttl = arg.lease, tonumber(arg.lease_ttl_s), tonumber(arg.key_ttl_s)
local is_retry = arg.is_retry == '1'

local f = redis.call('HMGET', bk, 'st', 'oa', 'ca', 'cf', 'cs', 'ring', 'pos', 'cnt', 'nf', 'ns', 'nr', 'mode', 'rev',
                    'rif', 'wd', 'tw')
local st = f[1] or 'closed'
local oa, ca = f[2] or '', f[3] or ''
local cf, cs = tonumber(f[4]) or 0, tonumber(f[5]) or 0
local ring, pos, cnt = f[6] or '', tonumber(f[7]) or 0, tonumber(f[8]) or 0
local nf, ns, nr = tonumber(f[9]) or 0, tonumber(f[10]) or 0, tonumber(f[11]) or 0
local mode = f[12] or arg.mode
local rev = f[13] or '0'
local rif = tonumber(f[14]) or 0  -- retries admitted, not yet recorded: they count against the budget now
local wd = tonumber(f[15]) or 0  -- the stored window's duration (0: a count window, kept in ring)
local changed = false
local out = {}  -- the transitions

-- A time window: breaker.py's buckets (time_buckets: at most MAX_BUCKETS, each width s, numbered
-- floor(t / width)), its non-empty ones kept in 'tw' as "number:calls:failures:slow:retries ...".
local nbuckets = math.min(wdur, 60)
local width = timed and wdur / nbuckets or 1
local buckets = {}
local current = math.floor(now / width)

local function reset_window()
  ring = timed and '' or string.rep('0', wsize)
  buckets, wd = {}, wdur
  pos, cnt, nf, ns, nr = 0, 0, 0, 0, 0
  changed = true
end

-- the buckets still in the window as of now, and the window's counts from them
local function age()
  cnt, nf, ns, nr = 0, 0, 0, 0
  for number, c, fl, sl, rt in string.gmatch(f[16] or '', '(%-?%d+):(%d+):(%d+):(%d+):(%d+)') do
    number, c, fl, sl, rt = tonumber(number), tonumber(c), tonumber(fl), tonumber(sl), tonumber(rt)
    if number > current - nbuckets then
      buckets[#buckets + 1] = {number, c, fl, sl, rt}
      cnt, nf, ns, nr = cnt + c, nf + fl, ns + sl, nr + rt
    else
      changed = true
    end
  end
end

if wd ~= wdur or (not timed and string.len(ring) ~= wsize) then
  reset_window()
elseif timed then
  age()
end

local function move(to, reason, by)
  out[#out + 1] = {st, to, reason, arg.now, by or ''}
  if to == 'open' then oa = arg.now elseif to == 'closed' then oa = '' end
  st, ca, cf, cs, rif = to, arg.now, 0, 0, 0
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

-- a time window's call recorded at t (deferred successes: earlier), unless its bucket already left the window
local function count_in_bucket(t, failed, slow, retry)
  local number = math.floor(t / width)
  if number <= current - nbuckets then return end
  local bucket
  for _, b in ipairs(buckets) do
    if b[1] == number then bucket = b end
  end
  if not bucket then
    bucket = {number, 0, 0, 0, 0}
    buckets[#buckets + 1] = bucket
  end
  local fl, sl, rt = failed and 1 or 0, slow and 1 or 0, retry and 1 or 0
  bucket[2], bucket[3], bucket[4], bucket[5] = bucket[2] + 1, bucket[3] + fl, bucket[4] + sl, bucket[5] + rt
  cnt, nf, ns, nr = cnt + 1, nf + fl, ns + sl, nr + rt
  changed = true
end

local function pct(n) return string.format('%.0f', 100 * n / cnt) end

-- the window a rate was measured over, for a transition's reason (breaker.py says the same)
local function calls_text()
  if timed then return cnt .. ' calls in the last ' .. arg.window_duration_s .. ' s' end
  return cnt .. ' calls'
end

local function record(outcome, slow, trial, retry, t)
  if retry and rif > 0 then
    rif = rif - 1
    changed = true
  end
  if outcome == 'ignored' then return end
  local failed = outcome == 'failure'
  if timed then count_in_bucket(t, failed, slow, retry) else push(failed, slow, retry) end
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
        move('open', 'failure rate ' .. pct(nf) .. '% >= ' .. arg.failure_rate_threshold .. '% over ' .. calls_text())
      elseif srate > 0 and ns * 100 >= srate * cnt then
        move('open', 'slow call rate ' .. pct(ns) .. '% >= ' .. arg.slow_call_rate_threshold .. '% over ' ..
             calls_text())
      end
    end
  end
end

-- successes this process deferred ride on this round trip, before anything else
local deferred_at = tonumber(arg.deferred_at)
for _ = 1, tonumber(arg.deferred_successes) do record('success', false, false, false, deferred_at) end
for _ = 1, tonumber(arg.deferred_retry_successes) do record('success', false, false, true, deferred_at) end

local decision, reason = 'admit', ''

if op == 'acquire' then
  if is_retry and budget >= 0 and cnt >= minc and
      (nr + rif + 1) * 100 > budget * (timed and cnt + rif + 1 or math.min(cnt + rif + 1, wsize)) then
    decision, reason = 'refuse', 'budget'
  elseif mode == 'forced_open' then
    decision, reason = 'refuse', 'forced'
  elseif mode ~= 'forced_closed' then
    if st == 'open' then
      if now - tonumber(oa) < rto then
        if mode ~= 'metrics_only' then decision, reason = 'refuse', 'open' end
      else
        move('half_open', 'reset timeout elapsed')
      end
    end
    if st == 'half_open' and reason == '' then
      redis.call('ZREMRANGEBYSCORE', lk, '-inf', now)  -- leases of attempts that never reported back
      if redis.call('ZCARD', lk) >= homax then
        if mode ~= 'metrics_only' then decision, reason = 'refuse', 'half_open' end
      else
        redis.call('ZADD', lk, now + lease_ttl, lease)
        redis.call('EXPIRE', lk, key_ttl)
        decision = 'trial'
      end
    end
  end
  if decision ~= 'refuse' and (hlim >= 0 or dlim >= 0) then
    local used = redis.call('MGET', hk, dk)
    local hourly, daily = tonumber(used[1]) or 0, tonumber(used[2]) or 0
    local full = (hlim >= 0 and hourly >= hlim and 'hourly') or (dlim >= 0 and daily >= dlim and 'daily') or nil
    if full then
      if decision == 'trial' then redis.call('ZREM', lk, lease) end
      decision, reason = 'refuse', 'quota:' .. full
    else
      if redis.call('INCR', hk) == 1 then redis.call('EXPIRE', hk, 3600 + 60) end
      if redis.call('INCR', dk) == 1 then redis.call('EXPIRE', dk, 86400 + 60) end
    end
  end
  if decision ~= 'refuse' and is_retry then
    rif = rif + 1
    changed = true
  end
elseif op == 'record' then
  local trial = arg.trial == '1'
  if trial then redis.call('ZREM', lk, lease) end
  record(arg.outcome, arg.slow == '1', trial, is_retry, now)
elseif op == 'reset' then
  if st ~= 'closed' then
    move('closed', arg.reason, arg.by)
  else
    cf, cs, ca = 0, 0, arg.now
    redis.call('DEL', lk)
    reset_window()
  end
elseif op == 'publish' then
  mode, rev = arg.mode, arg.revision
  changed = true
end

if changed then
  local kept = {}
  for i, b in ipairs(buckets) do kept[i] = string.format('%d:%d:%d:%d:%d', b[1], b[2], b[3], b[4], b[5]) end
  redis.call('HSET', bk, 'st', st, 'oa', oa, 'ca', ca, 'cf', cf, 'cs', cs, 'ring', ring, 'pos', pos,
             'cnt', cnt, 'nf', nf, 'ns', ns, 'nr', nr, 'rev', rev, 'rif', rif, 'wd', wd, 'tw', table.concat(kept, ' '))
  if f[12] or op == 'publish' then redis.call('HSET', bk, 'mode', mode) end
  redis.call('EXPIRE', bk, key_ttl)
end

local counts = {}
if op == 'snapshot' then
  counts = {ca, cf, cs, redis.call('ZCOUNT', lk, now, '+inf'), cnt, nf, ns, nr}
end
return {decision, reason, st, oa, rev, mode, out, counts}
