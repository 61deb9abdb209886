--[[ cond.lua: Condition.

KEYS[1]  k          HASH  kind="cond" (exists while someone waits)
KEYS[2]  w          LIST  waiter ids, FIFO
KEYS[3]  lk         HASH  state of the condition's lock (see permits.lua)
KEYS[4]  lq         LIST  the lock's queue
KEYS[5]  P.."sessions"
KEYS[6]  P.."fence"
ARGV[1]  P
ARGV[2]  op         wait | cancel | notify | waiters
ARGV[3]  sid
ARGV[4]  wid (wait, cancel) | n (notify: how many, -1 = all)
ARGV[5]  lock kind  lock | rlock

Replies:
  wait:    {'waiting'} | {'notheld'} | {'nosession'}
  cancel:  {'notified'} (a notify arrived first) | {'cancelled'}
  notify:  {'ok', woken, woken sessions...} | {'notheld'}   (holder format, see permits.lua)
  waiters: {'ok', n}
  any op:  {'wrongtype', type} | {'conflict', kind, init}
           | {'corrupt', field, value, key} (this key or the lock's: check_kind)

`wait` joins the waiters and releases the lock in one script, so no notify can fall
between the two (no lost wake-up); sent again with the same wid (its reply was lost)
it answers 'waiting' without looking at the lock. `notify` sent again may wake more
waiters than asked: a spurious wake-up, which Condition's contract allows. `notify(n)` wakes the first n *live* waiters; a
waiter whose session ended is skipped and the notification passes to the next one. The
reply names the woken sessions, so the caller can see one on its host whose process
died with its lease still running, reap it, and notify once more in its place.
]]

local k, w, lk = KEYS[1], KEYS[2], KEYS[3]
local P, op, sid, lkind = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
local now = now_ms()

local bad = check_kind(k, 'cond', nil, {w}) or check_kind(lk, lkind, 1, {KEYS[4]})
if bad then return bad end
if op == 'wait' then
  -- Its release of the lock may grant it: a counter that is no token is reported first.
  local fence = corrupt_fence(P)
  if fence then return {'corrupt', P .. 'fence', fence} end
end

local function lock_held()
  return tonumber(redis.call('HGET', lk, 'h:' .. sid) or '0') > 0
end

if op == 'waiters' then
  local n = 0
  for _, x in ipairs(redis.call('LRANGE', w, 0, -1)) do
    if alive(P, sid_of(x), now) then n = n + 1 end
  end
  return {'ok', n}
end

if op == 'wait' then
  if not alive(P, sid, now) then return {'nosession'} end
  -- Sent again after a lost reply: the first run joined (and may have been notified
  -- since); the lock it released is not to be looked for again.
  local wid = ARGV[4]
  if redis.call('LPOS', w, wid) or redis.call('EXISTS', P .. 'in:' .. wid) == 1 then
    return {'waiting'}
  end
  if not lock_held() then return {'notheld'} end
  redis.call('HSET', k, 'kind', 'cond')
  redis.call('RPUSH', w, ARGV[4])
  redis.call('SADD', P .. 'h:' .. sid, k)
  local r = permits_release(P, lk, lkind, 1, sid, 1, now, '', false)
  if r[1] ~= 'ok' then return {'notheld'} end
  return {'waiting'}
end

if op == 'cancel' then
  local wid = ARGV[4]
  redis.call('LREM', w, 0, wid)
  local got = take_grant(P, wid)
  if not queued_in(w, sid) then redis.call('SREM', P .. 'h:' .. sid, k) end
  if redis.call('LLEN', w) == 0 then redis.call('DEL', k) end
  if got then return {'notified'} end
  return {'cancelled'}
end

if op == 'notify' then
  if not lock_held() then return {'notheld'} end
  local n = tonumber(ARGV[4])
  local woken = 0
  local who = {}
  while n < 0 or woken < n do
    local x = redis.call('LPOP', w)
    if not x then break end
    local xsid = sid_of(x)
    if alive(P, xsid, now) then
      push_grant(P, x, 'n')
      woken = woken + 1
      for _, f in ipairs(session_info(P, xsid, 1)) do who[#who + 1] = f end
    end
    if not queued_in(w, xsid) then redis.call('SREM', P .. 'h:' .. xsid, k) end
  end
  if redis.call('LLEN', w) == 0 then redis.call('DEL', k) end
  local out = {'ok', woken}
  for _, f in ipairs(who) do out[#out + 1] = f end
  return out
end

return redis.error_reply('procsync: unknown cond op ' .. tostring(op))
