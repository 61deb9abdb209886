--[[ procsync shared Lua library: prepended to every script by procsync.backend.scripts.

Key layout. Every key of a namespace starts with the prefix P = "procsync:{<namespace>}:",
so all of them share one hash tag and one Redis Cluster slot; a script may therefore
touch a primitive and the session registry together.

  P.."sessions"        ZSET  session id -> lease deadline (server ms)       [declared]
  P.."fence"           STRING fencing-token counter for the namespace; ahead of
                       the clock during a quiet period (epoch.lua)          [declared]
  P.."epoch"           HASH  the server run the state was last seen on      [declared]
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
now_ms, alive, next_token, corrupt_fence, sid_of, queued_in, identity_notice,
INBOX_TTL_MS and permits_dispatch of one permit: a change to any of them must be made
there too (tests/test_permits_script.py compares the two paths).
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

-- Next fencing token of the namespace: one more than the last, and never below the
-- server clock in microseconds (now_ms * 1000). So tokens strictly increase, and also
-- dominate every token handed out before a restart that lost the counter or a failover
-- to a replica whose counter lagged -- as long as the servers' clocks agree to within
-- the time such an event takes (a new primary's clock is ahead of the old one's at the
-- moment it failed). Fewer than 1000 grants per millisecond keep the counter at the
-- clock; each grant costs a script, so the counter never runs ahead of it for long.
-- A counter that is not a non-negative integer below 2^53 (written by something
-- else) is an error before anything is written (see corrupt_fence).
local TOKEN_MAX = 9007199254740991  -- 2^53 - 1: exact in Lua's numbers

local function corrupt_fence(P)
  local v = redis.call('GET', P .. 'fence')
  if not v then return nil end
  local n = tonumber(v)
  if not n or n < 0 or n ~= math.floor(n) or n >= TOKEN_MAX then return v end
  return nil
end

-- A counter more than this ahead of the clock (microseconds) is a quiet period after
-- lost state (epoch.lua): nothing is granted until the clock catches up.
local QUIET_SLACK_US = 1000000

-- The quiet period's end (ms), or nil when grants may be made at server time now.
local function quiet_until(P, now)
  local c = tonumber(redis.call('GET', P .. 'fence') or '0') or 0
  if c >= TOKEN_MAX then return nil end  -- (no token: see next_token)
  if c + 1 > now * 1000 + QUIET_SLACK_US then return math.floor(c / 1000) - 1000 end
  return nil
end

-- (callers check quiet_until first: during a quiet period nothing is granted; and
-- permits.lua and cond.lua refuse a counter that is no token before writing anything:
-- met anyway, here while a session is reaped, it counts as lost, so the clock decides)
local function next_token(P, now)
  local f = P .. 'fence'
  local c = tonumber(redis.call('GET', f) or '0')
  if not c or c < 0 or c ~= math.floor(c) or c >= TOKEN_MAX then c = 0 end
  local t = c + 1
  local floor = now * 1000
  if t < floor then t = floor end
  redis.call('SET', f, string.format('%d', t))
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
--           "a:"..sid -> held since (ms), "i:"..sid -> waiter id (and inbox) of its
--           latest grant, "n:"..sid -> token of that grant (semaphores: a lock's is t),
--           "o:"..sid -> id of its latest release (semaphores, while the key lives)
--   LIST side(P, k, 'q'): FIFO of waiter ids
-- A permit primitive with every permit free and no waiter has no key.
--
-- Retries find their first run's answer (a reply lost with the connection, a timeout,
-- a garbled reply): a grant is recorded with the waiter id it went to ("i:"), so an
-- acquire or cancel sent again with that id returns the same grant; a lock's release
-- names the grant it ends, and a semaphore's carries an id ("o:"); and a hold ends
-- only by its release or by its session's end, so a live session that no longer holds
-- what it releases has released it already.

-- The token of the grant session sid holds in permit primitive k, if its latest grant
-- went to waiter wid (a retry of that acquire, or a cancel after it).
local function grant_of(k, sid, wid)
  if redis.call('HGET', k, 'i:' .. sid) ~= wid or not redis.call('HGET', k, 'h:' .. sid) then
    return nil
  end
  local kind = redis.call('HGET', k, 'kind')
  if kind == 'lock' or kind == 'rlock' then return tonumber(redis.call('HGET', k, 't')) end
  return tonumber(redis.call('HGET', k, 'n:' .. sid))
end

local function permits_dispatch(P, k, now)
  local q = side(P, k, 'q')
  local s = redis.call('HMGET', k, 'v', 'kind')
  local v = tonumber(s[1])
  local lockish = s[2] == 'lock' or s[2] == 'rlock'
  local granted = {}
  local granted_sids = {}
  if v > 0 and quiet_until(P, now) then return granted end  -- the waiters stay queued
  while v > 0 do
    local w = redis.call('LPOP', q)
    if not w then break end
    local wsid = sid_of(w)
    if alive(P, wsid, now) then
      v = v - 1
      local tok = next_token(P, now)
      if redis.call('HINCRBY', k, 'h:' .. wsid, 1) == 1 then
        redis.call('HSET', k, 'a:' .. wsid, now)  -- holding since
      end
      -- its waiter id: its inbox (dropped if the holder dies), and what a retry matches
      redis.call('HSET', k, 'i:' .. wsid, w)
      if not lockish then redis.call('HSET', k, 'n:' .. wsid, string.format('%d', tok)) end
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
    redis.call('HDEL', k, 'o:' .. sid)
    if n > 0 then
      redis.call('HDEL', k, 'h:' .. sid, 'a:' .. sid, 'i:' .. sid, 'n:' .. sid)
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
-- wrote is reported and left as it was: a key or side list of another type
-- {'wrongtype', type}; a name in use with another kind or shape {'conflict', kind, init};
-- our kind of hash with a field the scripts compute with or test missing, or holding
-- what procsync never writes {'corrupt', field, value (false: missing), k}. The fields
-- checked: permits init, v (0 <= v, and v <= init but for sem), t, g, r; barrier init,
-- count (< init), broken; event set (flags "0" | "1", or absent). The per-session
-- fields ("h:" .. sid ...) are not read here: that would cost a read of the whole hash.
local function check_kind(k, kind, init, sides)
  for _, sk in ipairs(sides or {}) do
    local st = redis.call('TYPE', sk)['ok']
    if st ~= 'none' and st ~= 'list' then return {'wrongtype', st} end
  end
  local typ = redis.call('TYPE', k)['ok']
  if typ == 'none' then return nil, true end
  if typ ~= 'hash' then return {'wrongtype', typ} end
  local permits = kind == 'lock' or kind == 'rlock' or kind == 'sem' or kind == 'bsem'
  local s, counts, flag
  if permits then
    s = redis.call('HMGET', k, 'kind', 'init', 'v', 't', 'g', 'r')
    counts = {'init', 'v', 't', 'g', 'r'}
  elseif kind == 'barrier' then
    s = redis.call('HMGET', k, 'kind', 'init', 'count', 'broken')
    counts, flag = {'init', 'count'}, 'broken'
  elseif kind == 'event' then
    s = redis.call('HMGET', k, 'kind', 'init', 'set')
    counts, flag = {}, 'set'
  else
    s = redis.call('HMGET', k, 'kind', 'init')
    counts = {}
  end
  if not s[1] then return {'wrongtype', 'hash'} end
  if s[1] ~= kind then return {'conflict', s[1], s[2] or ''} end
  -- A count: decimal digits that fit a signed 64-bit integer (HINCRBY's range).
  for i, f in ipairs(counts) do
    local x = s[i + 1]
    if not x or not string.match(x, '^%d+$')
       or #x > 19 or (#x == 19 and x > '9223372036854775807') then
      return {'corrupt', f, x and string.sub(x, 1, 100) or false, k}
    end
    if i == 1 and init and tonumber(x) ~= tonumber(init) then
      -- (a lock's init is 1: another one stored is corruption, not another shape)
      if (kind == 'lock' or kind == 'rlock') and tonumber(x) ~= 1 then
        return {'corrupt', f, x, k}
      end
      return {'conflict', s[1], x}
    end
  end
  if init and #counts == 0 and tonumber(s[2]) ~= tonumber(init) then
    return {'conflict', s[1], s[2] or ''}
  end
  if permits and kind ~= 'sem' and tonumber(s[3]) > tonumber(s[2]) then
    return {'corrupt', 'v', s[3], k}
  end
  if kind == 'barrier' and tonumber(s[3]) >= tonumber(s[2]) then
    return {'corrupt', 'count', s[3], k}
  end
  local fv = flag and s[#s]
  if fv and fv ~= '0' and fv ~= '1' then
    return {'corrupt', flag, string.sub(fv, 1, 100), k}
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
-- ref: a lock's release names the waiter id of the grant it ends; a semaphore's
-- release carries an id of its own ('' for neither). held: the caller believes it
-- holds permits. Both make a release sent again after a lost reply answer as the
-- first run did, without releasing twice (see "Retries" above).
local function permits_release(P, k, kind, init, sid, n, now, ref, held)
  local q = side(P, k, 'q')
  local is_lock = kind == 'lock' or kind == 'rlock'
  if redis.call('EXISTS', k) == 1 then permits_reap_dead_holders(P, k, now) end
  -- A live session that believes it holds, but holds nothing here, released already.
  local done_before = held and alive(P, sid, now)
  if redis.call('EXISTS', k) == 0 then
    if done_before then return {'ok', 0} end
    if is_lock or held then return {'notheld'} end
    if kind == 'bsem' then return {'overrelease'} end
    redis.call('HSET', k, 'kind', kind, 'init', init, 'v', init, 't', 0, 'g', 0, 'r', 0)
  end
  if not is_lock and ref ~= '' and redis.call('HGET', k, 'o:' .. sid) == ref then
    return {'ok', 0}
  end
  local mine = tonumber(redis.call('HGET', k, 'h:' .. sid) or '0')
  if is_lock and mine > 0 and ref ~= '' and redis.call('HGET', k, 'i:' .. sid) ~= ref then
    -- The session holds a later grant (another thread of its process took the lock
    -- after this release ran): the grant named is released already.
    return {'ok', 0}
  end
  if mine == 0 and held then
    if done_before then
      permits_maybe_delete(P, k)
      return {'ok', 0}
    end
    -- A semaphore's caller lost the permits it held (its session ended).
    if not is_lock then return {'notheld'} end
  end
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
      redis.call('HDEL', k, 'h:' .. sid, 'a:' .. sid, 'i:' .. sid, 'n:' .. sid)
      if not queued_in(q, sid) then redis.call('SREM', P .. 'h:' .. sid, k) end
    else
      redis.call('HINCRBY', k, 'h:' .. sid, -from_mine)
    end
  end
  redis.call('HINCRBY', k, 'v', n)
  if not is_lock and ref ~= '' then redis.call('HSET', k, 'o:' .. sid, ref) end
  local woken = 0
  for _ in pairs(permits_dispatch(P, k, now)) do woken = woken + 1 end
  permits_maybe_delete(P, k)
  return {'ok', woken}
end
