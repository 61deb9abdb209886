--[[ session.lua: the session registry (one session per process per server).

KEYS[1]  P.."sessions"   ZSET sid -> lease deadline (server ms)
KEYS[2]  P.."gone"       ZSET ended sid -> end time (retention index)
ARGV[1]  P
ARGV[2]  op              open | beat | close | reap | progress
ARGV[3]  sid
open:     ARGV[4] ttl_ms, ARGV[5] name, ARGV[6] host, ARGV[7] boot_id, ARGV[8] pid,
          ARGV[9] start_ticks, ARGV[10] heartbeat mode, ARGV[11] stall_after_ms (0 = off)
beat:     ARGV[4] ttl_ms, ARGV[5] reap batch size
reap:     ARGV[4] boot_id, ARGV[5] pid, ARGV[6] start_ticks  (the identity the caller saw dead)
progress: (no more arguments) the application says it made progress

Replies:
  open:     {'ok', now_ms, deadline_ms}
  beat:     {'ok', now_ms, deadline_ms, reaped} | {'unknown'}   (reaped or never opened)
  close:    {'ok'}
  reap:     {'ok', 1 if reaped else 0}
  progress: {'ok'} | {'unknown'}

A session is alive while its deadline is in the future. `beat` renews it and reaps up
to a batch of expired sessions (each a whole session: holds released, waits dropped,
death logged), so detection needs no extra process and no script runs long.
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

return redis.error_reply('procsync: unknown session op ' .. tostring(op))
