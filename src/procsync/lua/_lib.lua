--[[ procsync shared Lua library: prepended to every script by procsync.backend.scripts.

Key layout. Every key of a namespace starts with the prefix P = "procsync:{<namespace>}:",
so all of them share one hash tag and one Redis Cluster slot; a script may therefore
touch a primitive and the session registry together.

  P.."sessions"        ZSET  session id -> lease deadline (server ms)       [declared]
  P.."fence"           STRING fencing-token counter for the namespace       [declared]
  P.."s:"..sid         HASH  session identity and state                     [derived]
  P.."h:"..sid         SET   state keys this session holds or waits in      [derived]
  P.."in:"..wid        LIST  one waiter's inbox: grants are pushed here     [derived]
  P..kind.."/"..tag..":"..name  LIST  a primitive's queue / waiter lists (tag q, w,
                       a, r; see side()); no name can produce such a key    [declared]
  P.."events"          STREAM joined / left / died / stalled / forced       [derived]
  P.."gone"            ZSET  ended session id -> end time (retention index) [derived]

Derived keys are named from ids found in declared keys (a holder, a queue entry);
they carry the same hash tag, so they stay in the script's slot.

A waiter id (wid) is "<sid>/<n>"; its session id is the part before the slash.
A hold is valid exactly while its session is: a session is alive while its
deadline in P.."sessions" is in the future. An expired session is reaped
(reap_session) by whichever script meets it first.

permits_fast.lua runs before this library (for permits.lua only) and repeats, inline,
now_ms, alive, next_token, sid_of, queued_in, identity_notice, INBOX_TTL_MS and
permits_dispatch of one permit: a change to any of them must be made there too
(tests/test_permits_script.py compares the two paths).
]]

local RETENTION_MS = 3600000      -- how long an ended session stays listed
local INBOX_TTL_MS = 120000       -- an unclaimed grant token is dropped after this
local EVENTS_MAXLEN = 10000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function sid_of(wid)
  local i = string.find(wid, '/', 1, true)
  if i then return string.sub(wid, 1, i - 1) end
  return wid
end

-- Side key `tag` (q: queue, w: waiters, a/r: barrier arrivals) of state key k, as
-- "<P><kind>/<tag>:<name>". No name can forge it: state keys are "<P><kind>:<name>"
-- and no kind contains "/".
local function side(P, k, tag)
  local rest = string.sub(k, #P + 1)
  local i = string.find(rest, ':', 1, true)
  return P .. string.sub(rest, 1, i - 1) .. '/' .. tag .. ':' .. string.sub(rest, i + 1)
end

-- The deadline of a live session, or nil when it is unknown or expired.
local function alive(P, sid, now)
  local d = redis.call('ZSCORE', P .. 'sessions', sid)
  if d and tonumber(d) > now then return tonumber(d) end
  return nil
end

-- Next fencing token of the namespace. A missing counter means a fresh server or
-- lost data: it restarts from the server clock in microseconds, which is above every
-- token handed out before as long as fewer than one grant per microsecond was made.
local function next_token(P)
  local f = P .. 'fence'
  local t = redis.call('INCR', f)
  if t == 1 then
    t = now_us()
    redis.call('SET', f, string.format('%d', t))
  end
  return t
end

local function log_event(P, typ, sid, now, extra)
  local skey = P .. 's:' .. sid
  local info = redis.call('HMGET', skey, 'name', 'host', 'pid')
  local args = {'XADD', P .. 'events', 'MAXLEN', '~', EVENTS_MAXLEN, '*',
                'type', typ, 'sid', sid, 'at', now,
                'name', info[1] or '', 'host', info[2] or '', 'pid', info[3] or ''}
  if extra then
    for _, v in ipairs(extra) do args[#args + 1] = v end
  end
  redis.call(unpack(args))
end

-- "<sid>|<boot>|<pid>|<start>|<host>": what a waiter needs to watch a process.
local function identity_notice(P, sid)
  local id = redis.call('HMGET', P .. 's:' .. sid, 'boot', 'pid', 'start', 'host')
  return sid .. '|' .. (id[1] or '') .. '|' .. (id[2] or '0') .. '|' .. (id[3] or '0') .. '|'
    .. (id[4] or '')
end

-- Empty a waiter's inbox; return the grant in it, if any: any value but a watch notice
-- ("w:...", "peer:...") or the "wake" a cancelled asyncio waiter pushes to end its pop.
local function take_grant(P, wid)
  local inbox = P .. 'in:' .. wid
  local got = nil
  for _, v in ipairs(redis.call('LRANGE', inbox, 0, -1)) do
    if not got and v ~= 'wake' and string.sub(v, 1, 2) ~= 'w:' and string.sub(v, 1, 5) ~= 'peer:' then
      got = v
    end
  end
  redis.call('DEL', inbox)
  return got
end

local function push_grant(P, wid, value)
  local inbox = P .. 'in:' .. wid
  redis.call('LPUSH', inbox, value)
  redis.call('PEXPIRE', inbox, INBOX_TTL_MS)
end

-- Does session `sid` still wait in list `q`? (another thread of the same process may)
local function queued_in(q, sid)
  local prefix = sid .. '/'
  for _, w in ipairs(redis.call('LRANGE', q, 0, -1)) do
    if string.sub(w, 1, #prefix) == prefix then return true end
  end
  return false
end

-- Remove every entry of session `sid` from list `q`, and their inboxes.
local function unqueue_session(P, q, sid)
  local prefix = sid .. '/'
  for _, w in ipairs(redis.call('LRANGE', q, 0, -1)) do
    if string.sub(w, 1, #prefix) == prefix then
      redis.call('LREM', q, 0, w)
      redis.call('DEL', P .. 'in:' .. w)
    end
  end
end

--------------------------------------------------------------------------------
-- Permit primitives (Lock, RLock, Semaphore, BoundedSemaphore) share one state:
--   HASH k: kind, init, v (free permits), t (last token), g (grants),
--           r (permits reclaimed from dead holders), "h:"..sid -> permits held,
--           "a:"..sid -> held since (ms), "i:"..sid -> inbox of its latest grant
--   LIST side(P, k, 'q'): FIFO of waiter ids
-- A permit primitive with every permit free and no waiter has no key.

local function permits_dispatch(P, k, now)
  local q = side(P, k, 'q')
  local v = tonumber(redis.call('HGET', k, 'v'))
  local granted = {}
  local granted_sids = {}
  while v > 0 do
    local w = redis.call('LPOP', q)
    if not w then break end
    local wsid = sid_of(w)
    if alive(P, wsid, now) then
      v = v - 1
      local tok = next_token(P)
      if redis.call('HINCRBY', k, 'h:' .. wsid, 1) == 1 then
        redis.call('HSET', k, 'a:' .. wsid, now)  -- holding since
      end
      redis.call('HSET', k, 'i:' .. wsid, w)  -- its inbox, dropped if the holder dies
      redis.call('HSET', k, 'v', v, 't', string.format('%d', tok))
      redis.call('HINCRBY', k, 'g', 1)
      redis.call('SADD', P .. 'h:' .. wsid, k)
      redis.call('DEL', P .. 'in:' .. w)  -- watch notices are stale once granted
      push_grant(P, w, string.format('%d', tok))
      granted[w] = tok
      granted_sids[#granted_sids + 1] = wsid
    end
  end
  -- The new head of the queue watches the new holders (same-host crash detection
  -- passes down the queue with the lock): "w:<sid>|<boot>|<pid>|<start>|<host>".
  local head = redis.call('LINDEX', q, 0)
  if head then
    for _, hsid in ipairs(granted_sids) do
      push_grant(P, head, 'w:' .. identity_notice(P, hsid))
    end
  end
  return granted
end

-- Delete a permit primitive whose every permit is free and that nobody waits for.
local function permits_maybe_delete(P, k)
  local s = redis.call('HMGET', k, 'v', 'init')
  if s[1] and tonumber(s[1]) == tonumber(s[2]) and redis.call('LLEN', side(P, k, 'q')) == 0 then
    for _, f in ipairs(redis.call('HKEYS', k)) do
      if string.sub(f, 1, 2) == 'h:' then return false end
    end
    redis.call('DEL', k)
    return true
  end
  return false
end

--------------------------------------------------------------------------------
-- Barrier: HASH k: kind="barrier", init=parties, count (arrived this generation),
-- gen, broken "0"|"1", runner (sid running the action) ; LIST side(P, k, "a") arrivals of the
-- generation filling up; LIST side(P, k, "r") arrivals released once the action has run.

-- Break the barrier: every waiter of both lists is woken with "broken".
local function barrier_break(P, k, why)
  for _, lst in ipairs({side(P, k, 'a'), side(P, k, 'r')}) do
    for _, w in ipairs(redis.call('LRANGE', lst, 0, -1)) do
      redis.call('DEL', P .. 'in:' .. w)  -- drop stale peer notices
      push_grant(P, w, 'broken')
      redis.call('SREM', P .. 'h:' .. sid_of(w), k)
    end
    redis.call('DEL', lst)
  end
  redis.call('HSET', k, 'broken', '1', 'count', 0, 'why', why)
  redis.call('HDEL', k, 'runner')
end

-- Forward declaration: kind-specific cleanup when a session ends.
local drop_session_from

-- End session `sid`: its holds return, its waits vanish, its end is logged.
-- why: 'died' (lease expired or process gone), 'left' (clean close), 'forced'.
-- extra: optional flat list of more event fields (e.g. who forced it).
local function reap_session(P, sid, now, why, extra)
  redis.call('ZREM', P .. 'sessions', sid)
  local hk = P .. 'h:' .. sid
  for _, k in ipairs(redis.call('SMEMBERS', hk)) do
    drop_session_from(P, k, sid, now)
  end
  redis.call('DEL', hk)
  local skey = P .. 's:' .. sid
  if redis.call('EXISTS', skey) == 1 then
    local state = 'dead'
    if why == 'left' then state = 'left' end
    redis.call('HSET', skey, 'state', state, 'ended', now)
    redis.call('PEXPIRE', skey, RETENTION_MS)
    redis.call('ZADD', P .. 'gone', now, sid)
    log_event(P, why, sid, now, extra)
  end
end

-- Reap every expired holder of permit primitive k (each one whole session).
local function permits_reap_dead_holders(P, k, now)
  for _, f in ipairs(redis.call('HKEYS', k)) do
    if string.sub(f, 1, 2) == 'h:' then
      local hsid = string.sub(f, 3)
      if not alive(P, hsid, now) then reap_session(P, hsid, now, 'died') end
    end
  end
end

drop_session_from = function(P, k, sid, now)
  local kind = redis.call('HGET', k, 'kind')
  if not kind then return end
  if kind == 'lock' or kind == 'rlock' or kind == 'sem' or kind == 'bsem' then
    local n = tonumber(redis.call('HGET', k, 'h:' .. sid) or '0')
    local inbox = redis.call('HGET', k, 'i:' .. sid)
    if inbox then redis.call('DEL', P .. 'in:' .. inbox) end
    if n > 0 then
      redis.call('HDEL', k, 'h:' .. sid, 'a:' .. sid, 'i:' .. sid)
      redis.call('HINCRBY', k, 'v', n)
      redis.call('HINCRBY', k, 'r', n)
    end
    unqueue_session(P, side(P, k, 'q'), sid)
    permits_dispatch(P, k, now)
    permits_maybe_delete(P, k)
  elseif kind == 'event' then
    local w = side(P, k, 'w')
    unqueue_session(P, w, sid)
    if redis.call('HGET', k, 'set') ~= '1' and redis.call('LLEN', w) == 0 then
      redis.call('DEL', k)
    end
  elseif kind == 'cond' then
    local w = side(P, k, 'w')
    unqueue_session(P, w, sid)
    if redis.call('LLEN', w) == 0 then redis.call('DEL', k) end
  elseif kind == 'barrier' then
    local a, r = side(P, k, 'a'), side(P, k, 'r')
    local involved = queued_in(a, sid) or queued_in(r, sid) or redis.call('HGET', k, 'runner') == sid
    if involved then
      unqueue_session(P, a, sid)
      unqueue_session(P, r, sid)
      barrier_break(P, k, 'a party died')
    end
  end
end

-- Check the state key k and its side lists: (nil, absent?) when usable, or an error
-- reply table. Nothing is written before these checks pass, so a key someone else
-- wrote is reported and left as it was.
local function check_kind(k, kind, init, sides)
  for _, sk in ipairs(sides or {}) do
    local st = redis.call('TYPE', sk)['ok']
    if st ~= 'none' and st ~= 'list' then return {'wrongtype', st} end
  end
  local typ = redis.call('TYPE', k)['ok']
  if typ == 'none' then return nil, true end
  if typ ~= 'hash' then return {'wrongtype', typ} end
  local s = redis.call('HMGET', k, 'kind', 'init')
  if not s[1] then return {'wrongtype', 'hash'} end
  if s[1] ~= kind or (init and tonumber(s[2]) ~= tonumber(init)) then
    return {'conflict', s[1], s[2] or ''}
  end
  return nil, false
end

-- How many waiters just ahead of it a queued waiter watches.
local WATCH_AHEAD = 4

-- One session's identity in the holder format: sid, deadline, boot, pid, start, host, n.
local function session_info(P, sid, n)
  local d = redis.call('ZSCORE', P .. 'sessions', sid) or '0'
  local id = redis.call('HMGET', P .. 's:' .. sid, 'boot', 'pid', 'start', 'host')
  return {sid, tostring(d), id[1] or '', id[2] or '0', id[3] or '0', id[4] or '', n}
end

-- Identity of up to `limit` holders of k: flat list sid, deadline, boot, pid, start,
-- host, permits held.
local function holders_info(P, k, limit)
  local out = {}
  local n = 0
  for _, f in ipairs(redis.call('HKEYS', k)) do
    if string.sub(f, 1, 2) == 'h:' and n < limit then
      local hsid = string.sub(f, 3)
      local d = redis.call('ZSCORE', P .. 'sessions', hsid) or '0'
      local id = redis.call('HMGET', P .. 's:' .. hsid, 'boot', 'pid', 'start', 'host')
      out[#out + 1] = hsid
      out[#out + 1] = tostring(d)
      out[#out + 1] = id[1] or ''
      out[#out + 1] = id[2] or '0'
      out[#out + 1] = id[3] or '0'
      out[#out + 1] = id[4] or ''
      out[#out + 1] = redis.call('HGET', k, f)
      n = n + 1
    end
  end
  return out
end

-- Give back n permits of k held (or, for semaphores, not held) by session sid, then
-- serve the queue. Returns the reply of permits.lua's release op.
local function permits_release(P, k, kind, init, sid, n, now)
  local q = side(P, k, 'q')
  local is_lock = kind == 'lock' or kind == 'rlock'
  if redis.call('EXISTS', k) == 1 then permits_reap_dead_holders(P, k, now) end
  if redis.call('EXISTS', k) == 0 then
    if is_lock then return {'notheld'} end
    if kind == 'bsem' then return {'overrelease'} end
    redis.call('HSET', k, 'kind', kind, 'init', init, 'v', init, 't', 0, 'g', 0, 'r', 0)
  end
  local mine = tonumber(redis.call('HGET', k, 'h:' .. sid) or '0')
  if is_lock and mine == 0 then
    local others = holders_info(P, k, 32)
    permits_maybe_delete(P, k)
    if #others > 0 then
      local out = {'notowner'}
      for _, x in ipairs(others) do out[#out + 1] = x end
      return out
    end
    return {'notheld'}
  end
  local from_mine = math.min(mine, n)
  local extra = n - from_mine
  if kind == 'bsem' and extra > 0 then
    local total = tonumber(redis.call('HGET', k, 'v'))
    for _, f in ipairs(redis.call('HKEYS', k)) do
      if string.sub(f, 1, 2) == 'h:' then total = total + tonumber(redis.call('HGET', k, f)) end
    end
    if total + extra > init then
      permits_maybe_delete(P, k)
      return {'overrelease'}
    end
  end
  if from_mine > 0 then
    if from_mine == mine then
      redis.call('HDEL', k, 'h:' .. sid, 'a:' .. sid, 'i:' .. sid)
      if not queued_in(q, sid) then redis.call('SREM', P .. 'h:' .. sid, k) end
    else
      redis.call('HINCRBY', k, 'h:' .. sid, -from_mine)
    end
  end
  redis.call('HINCRBY', k, 'v', n)
  local woken = 0
  for _ in pairs(permits_dispatch(P, k, now)) do woken = woken + 1 end
  permits_maybe_delete(P, k)
  return {'ok', woken}
end
