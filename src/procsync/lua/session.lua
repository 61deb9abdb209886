--[[ session.lua: the session registry (one session per process per server).

KEYS[1]  P.."sessions"   ZSET sid -> lease deadline (server ms)
KEYS[2]  P.."gone"       ZSET ended sid -> end time (retention index)
ARGV[1]  P
ARGV[2]  op              open | beat | close | reap | progress | sweep | force | holds
ARGV[3]  sid             ('-' for sweep)
open:     ARGV[4] ttl_ms, ARGV[5] name, ARGV[6] host, ARGV[7] boot_id, ARGV[8] pid,
          ARGV[9] start_ticks, ARGV[10] heartbeat mode, ARGV[11] stall_after_ms (0 = off)
beat:     ARGV[4] ttl_ms, ARGV[5] reap batch size
reap:     ARGV[4] boot_id, ARGV[5] pid, ARGV[6] start_ticks  (the identity the caller saw dead)
progress: (no more arguments) the application says it made progress
sweep:    ARGV[4] batch size, ARGV[5] retention ms ('' = RETENTION_MS)
force:    ARGV[4] who forces it (free text), ARGV[5] what it was forced for (a state key)
holds:    (no more arguments) what the server records the session as holding

Replies:
  open:     {'ok', now_ms, deadline_ms}
  beat:     {'ok', now_ms, deadline_ms, reaped} | {'unknown'}   (reaped or never opened)
  close:    {'ok'}
  reap:     {'ok', 1 if reaped else 0}
  progress: {'ok'} | {'unknown'}
  sweep:    {'ok', now_ms, reaped, forgotten, next_deadline_ms (-1: no session), more 0|1}
  force:    {'ok', 1 if ended else 0}
  holds:    {'ok', state key...} (the permit primitives it holds permits of) | {'unknown'}

A session is alive while its deadline is in the future. `beat` renews it and reaps up
to a batch of expired sessions (each a whole session: holds released, waits dropped,
death logged), so detection needs no extra process and no script runs long.

`sweep` is the same bounded reaping for readers of the registry (procsync.registry:
sessions(), watch()), so deaths are reported even when no other session beats; it also
forgets, a batch at a time, sessions ended longer than the retention ago and trims the
event stream to the same window (an empty stream is deleted: nothing is left behind;
nor is the epoch of a namespace with no session live or remembered).
It replies the earliest live deadline, so a watcher knows when to sweep next.

`force` is an operator's release (procsync release NAME --force): the holder's whole
session ends as 'forced' (state 'dead'); its holds go to the next waiters at once and
its process finds its session unknown at its next heartbeat (holds lost). Who forced it
is kept in the session hash (forced_by, forced_what) and passed to the event.
]]

local P, op, sid = ARGV[1], ARGV[2], ARGV[3]
local now = now_ms()
local skey = P .. 's:' .. sid

local function reap_expired(batch)
  local n = 0
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, batch)
  for _, x in ipairs(expired) do
    reap_session(P, x, now, 'died')
    n = n + 1
  end
  -- Forget ended sessions past retention (their hashes expire by themselves).
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - RETENTION_MS)
  return n
end

if op == 'open' then
  local ttl = tonumber(ARGV[4])
  redis.call('HSET', skey, 'id', sid, 'name', ARGV[5], 'host', ARGV[6], 'boot', ARGV[7],
             'pid', ARGV[8], 'start', ARGV[9], 'hb', ARGV[10], 'stall_after', ARGV[11],
             'ttl', ttl, 'started', now, 'beat', now, 'progress', now, 'state', 'alive')
  redis.call('PERSIST', skey)
  -- The longest ttl the namespace has seen: how long a quiet period lasts (epoch.lua).
  local ek = P .. 'epoch'
  if ttl > (tonumber(redis.call('HGET', ek, 'ttl') or '0') or 0) then
    redis.call('HSET', ek, 'ttl', ttl)
  end
  redis.call('ZADD', KEYS[1], now + ttl, sid)
  redis.call('ZREM', KEYS[2], sid)
  log_event(P, 'joined', sid, now)
  return {'ok', now, now + ttl}
end

if op == 'beat' then
  local d = redis.call('ZSCORE', KEYS[1], sid)
  if not d then return {'unknown'} end
  if tonumber(d) <= now then
    -- Expired before this renewal arrived: others may already act on it. Dead.
    reap_session(P, sid, now, 'died')
    return {'unknown'}
  end
  local ttl = tonumber(ARGV[4])
  redis.call('ZADD', KEYS[1], now + ttl, sid)
  redis.call('HSET', skey, 'beat', now, 'ttl', ttl)
  local stall = tonumber(redis.call('HGET', skey, 'stall_after') or '0')
  if stall > 0 then
    local prog = tonumber(redis.call('HGET', skey, 'progress') or now)
    local state = redis.call('HGET', skey, 'state')
    if now - prog > stall and state == 'alive' then
      redis.call('HSET', skey, 'state', 'stalled')
      log_event(P, 'stalled', sid, now)
    end
  end
  local reaped = reap_expired(tonumber(ARGV[5]))
  return {'ok', now, now + ttl, reaped}
end

if op == 'progress' then
  if not redis.call('ZSCORE', KEYS[1], sid) then return {'unknown'} end
  redis.call('HSET', skey, 'progress', now)
  if redis.call('HGET', skey, 'state') == 'stalled' then
    redis.call('HSET', skey, 'state', 'alive')
    log_event(P, 'resumed', sid, now)
  end
  return {'ok'}
end

if op == 'close' then
  if redis.call('ZSCORE', KEYS[1], sid) then reap_session(P, sid, now, 'left') end
  return {'ok'}
end

if op == 'reap' then
  if not redis.call('ZSCORE', KEYS[1], sid) then return {'ok', 0} end
  local id = redis.call('HMGET', skey, 'boot', 'pid', 'start')
  if id[1] == ARGV[4] and id[2] == ARGV[5] and id[3] == ARGV[6] then
    reap_session(P, sid, now, 'died')
    return {'ok', 1}
  end
  return {'ok', 0}
end

if op == 'sweep' then
  local batch = tonumber(ARGV[4])
  local keep = tonumber(ARGV[5] or '') or RETENTION_MS
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, batch)
  for _, x in ipairs(expired) do reap_session(P, x, now, 'died') end
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - keep, 'LIMIT', 0, batch)
  for _, x in ipairs(old) do
    redis.call('DEL', P .. 's:' .. x)
    redis.call('ZREM', KEYS[2], x)
  end
  local ev = P .. 'events'
  if redis.call('EXISTS', ev) == 1 then
    redis.call('XTRIM', ev, 'MINID', string.format('%d', now - keep + 1))
    if redis.call('XLEN', ev) == 0 then redis.call('DEL', ev) end
  end
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if not first[1] and redis.call('EXISTS', KEYS[2]) == 0 then
    -- Nobody is or was here within the retention: no lease to protect, no epoch.
    redis.call('DEL', P .. 'epoch')
  end
  local more = 0
  if #expired == batch or #old == batch then more = 1 end
  return {'ok', now, #expired, #old, first[2] or -1, more}
end

if op == 'force' then
  if not redis.call('ZSCORE', KEYS[1], sid) then return {'ok', 0} end
  redis.call('HSET', skey, 'forced_by', ARGV[4], 'forced_what', ARGV[5])
  reap_session(P, sid, now, 'forced', {'by', ARGV[4], 'what', ARGV[5]})
  return {'ok', 1}
end

if op == 'holds' then
  -- A reconnected session compares this with the holds its process believes in.
  if not alive(P, sid, now) then return {'unknown'} end
  local out = {'ok'}
  for _, k in ipairs(redis.call('SMEMBERS', P .. 'h:' .. sid)) do
    if tonumber(redis.call('HGET', k, 'h:' .. sid) or '0') > 0 then out[#out + 1] = k end
  end
  return out
end

return redis.error_reply('procsync: unknown session op ' .. tostring(op))
