--[[ barrier.lua: Barrier.

KEYS[1]  k          HASH  kind="barrier", init=parties, count, broken, runner, why
KEYS[2]  a          LIST  waiter ids of the generation filling up
KEYS[3]  r          LIST  waiter ids of the generation whose action is running
KEYS[4]  P.."sessions"
ARGV[1]  P
ARGV[2]  op         wait | done | abort | timeout | reset | state | check
ARGV[3]  sid
ARGV[4]  wid (wait, timeout, check)
ARGV[5]  parties
ARGV[6]  has_action 1 | 0 (wait)

Replies:
  wait:    {'wait', index, peers...} | {'go', index} (last, no action: all released)
           | {'run', index} (last: run the action, then 'done' or 'abort')
           | {'broken', why} | {'nosession'}
  done:    {'ok'} | {'broken', why}
  abort:   {'ok'}
  timeout: {'go'} | {'broken', why}   (a wait timed out: the barrier breaks, as threading's)
  reset:   {'ok'}
  state:   {'ok', count, broken 0|1, why}
  check:   {'waiting', index} | {'go'} | {'broken', why} | {'gone'}   (after a call or pop that
           failed: is this arrival waiting, released, broken -- or not known at all: it
           never arrived, or it was the last and released the others)
`wait` is the one call not sent again after its reply was lost (a second arrival would
count twice, in this generation or the next): the caller checks instead.
  any op:  {'wrongtype', type} | {'conflict', kind, parties}
           | {'corrupt', field, value, key} (see check_kind in _lib.lua)
peers... is (sid, deadline, boot, pid, start, host, 1) of the arrival just before, for
the newcomer to watch if on its host; the newcomer pushes "peer:<identity>" onto that
arrival's inbox, which then watches it in turn (the last arrival too, when it runs the
action). Every waiter thus watches both neighbours, and a party dying on the same host
breaks the barrier at once.

Inbox values: "go" (released), "broken", "peer:<sid>|<boot>|<pid>|<start>|<host>".
States: filling (count < parties) -> running (action) -> filling of the next generation;
any -> broken (timeout, abort, action raised, a party died) -> filling (reset).
A barrier with nobody waiting and not broken has no key.
]]

local k, a, r = KEYS[1], KEYS[2], KEYS[3]
local P, op, sid = ARGV[1], ARGV[2], ARGV[3]
local parties = tonumber(ARGV[5])
local now = now_ms()

local bad = check_kind(k, 'barrier', parties, {a, r})
if bad then return bad end

local function maybe_delete()
  if redis.call('HGET', k, 'broken') ~= '1' and tonumber(redis.call('HGET', k, 'count') or '0') == 0
     and redis.call('LLEN', a) == 0 and redis.call('LLEN', r) == 0
     and not redis.call('HGET', k, 'runner') then
    redis.call('DEL', k)
  end
end

local function release_all(lst)
  local released = redis.call('LRANGE', lst, 0, -1)
  redis.call('DEL', lst)
  for _, w in ipairs(released) do
    redis.call('DEL', P .. 'in:' .. w)  -- drop stale peer notices
    push_grant(P, w, 'go')
    -- (after the list is gone: a party of it still waits only in a later generation)
    local wsid = sid_of(w)
    if not queued_in(a, wsid) then redis.call('SREM', P .. 'h:' .. wsid, k) end
  end
end

if op == 'state' then
  local s = redis.call('HMGET', k, 'count', 'broken', 'why')
  return {'ok', tonumber(s[1] or '0'), s[2] == '1' and 1 or 0, s[3] or ''}
end

-- Where arrival wid stands: its position in the arrivals (the index wait returned) or
-- among those released once the action has run, else nil.
local function arrival(wid)
  local pos = redis.call('LPOS', a, wid)
  if pos then return pos end
  return redis.call('LPOS', r, wid)
end

-- What arrival wid's inbox says: 'go', 'broken' or nil (peer notices are left).
local function verdict(wid)
  for _, v in ipairs(redis.call('LRANGE', P .. 'in:' .. wid, 0, -1)) do
    if v == 'go' or v == 'broken' then return v end
  end
  return nil
end

if op == 'check' then
  local wid = ARGV[4]
  local v = verdict(wid)
  if v == 'go' then
    redis.call('DEL', P .. 'in:' .. wid)
    return {'go'}
  end
  if v == 'broken' or redis.call('HGET', k, 'broken') == '1' then
    return {'broken', redis.call('HGET', k, 'why') or ''}
  end
  local pos = arrival(wid)
  if pos then return {'waiting', pos} end
  return {'gone'}
end

if op == 'wait' then
  if not alive(P, sid, now) then return {'nosession'} end
  if redis.call('EXISTS', k) == 0 then
    redis.call('HSET', k, 'kind', 'barrier', 'init', parties, 'count', 0, 'broken', '0')
  end
  if redis.call('HGET', k, 'broken') == '1' then
    return {'broken', redis.call('HGET', k, 'why') or ''}
  end
  local index = tonumber(redis.call('HGET', k, 'count'))
  local prev = redis.call('LINDEX', a, -1)
  local function tell_prev()
    -- The arrival just before watches this one (same-host crash breaks at once).
    if prev then push_grant(P, prev, 'peer:' .. identity_notice(P, sid)) end
  end
  if index + 1 >= parties then
    redis.call('HSET', k, 'count', 0)
    if ARGV[6] == '1' then
      tell_prev()  -- the action's runner may die too
      -- The arrivals wait in :r while the last party runs the action.
      if redis.call('LLEN', a) > 0 then
        for _, w in ipairs(redis.call('LRANGE', a, 0, -1)) do redis.call('RPUSH', r, w) end
        redis.call('DEL', a)
      end
      redis.call('HSET', k, 'runner', sid)
      redis.call('SADD', P .. 'h:' .. sid, k)
      return {'run', index}
    end
    release_all(a)
    maybe_delete()
    return {'go', index}
  end
  -- The arrival just before us is our neighbour to watch; it is told of us in turn.
  local peers = {}
  if prev then peers = session_info(P, sid_of(prev), 1) end
  redis.call('RPUSH', a, ARGV[4])
  redis.call('HSET', k, 'count', index + 1)
  redis.call('SADD', P .. 'h:' .. sid, k)
  tell_prev()
  local out = {'wait', index}
  for _, x in ipairs(peers) do out[#out + 1] = x end
  return out
end

if op == 'done' then
  if redis.call('HGET', k, 'broken') == '1' then
    return {'broken', redis.call('HGET', k, 'why') or ''}
  end
  redis.call('HDEL', k, 'runner')
  release_all(r)
  if not queued_in(a, sid) then redis.call('SREM', P .. 'h:' .. sid, k) end
  maybe_delete()
  return {'ok'}
end

if op == 'abort' then
  if redis.call('EXISTS', k) == 0 then
    redis.call('HSET', k, 'kind', 'barrier', 'init', parties, 'count', 0)
  end
  barrier_break(P, k, ARGV[4] ~= '' and ARGV[4] or 'aborted')
  redis.call('SREM', P .. 'h:' .. sid, k)
  return {'ok'}
end

if op == 'timeout' then
  local wid = ARGV[4]
  local inbox = P .. 'in:' .. wid
  -- A release or break that arrived first wins; "peer" notices are stale now.
  for _, v in ipairs(redis.call('LRANGE', inbox, 0, -1)) do
    if v == 'go' or v == 'broken' then
      redis.call('DEL', inbox)
      if v == 'go' then return {'go'} end
      return {'broken', redis.call('HGET', k, 'why') or ''}
    end
  end
  redis.call('DEL', inbox)
  if redis.call('EXISTS', k) == 0 then
    redis.call('HSET', k, 'kind', 'barrier', 'init', parties, 'count', 0)
  end
  if redis.call('HGET', k, 'broken') ~= '1' then barrier_break(P, k, 'a wait timed out') end
  redis.call('SREM', P .. 'h:' .. sid, k)
  return {'broken', redis.call('HGET', k, 'why') or ''}
end

if op == 'reset' then
  if redis.call('EXISTS', k) == 0 then return {'ok'} end
  barrier_break(P, k, 'reset')
  redis.call('HSET', k, 'broken', '0', 'count', 0)
  redis.call('HDEL', k, 'why')
  maybe_delete()
  return {'ok'}
end

return redis.error_reply('procsync: unknown barrier op ' .. tostring(op))
