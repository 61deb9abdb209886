--[[ event.lua: Event.

KEYS[1]  k          HASH  kind="event", set="1"|"0"
KEYS[2]  w          LIST  waiter ids
KEYS[3]  P.."sessions"
ARGV[1]  P
ARGV[2]  op         wait | cancel | set | clear | is_set
ARGV[3]  sid
ARGV[4]  wid        (wait, cancel)
ARGV[5]  keep_ms    (set) expiry of a set flag in ms, 0 = keep until deleted

Replies:
  wait:   {'set'} | {'waiting'} | {'nosession'}
  cancel: {'set'} (woken before the cancel arrived) | {'cancelled'}
  set:    {'ok', woken}
  clear:  {'ok'}
  is_set: {'ok', 0|1, waiters}
  any op: {'wrongtype', type} | {'conflict', kind, init}
          | {'corrupt', field, value, key} (see check_kind in _lib.lua)

States: absent (clear, nobody waits) -> waiting (clear, waiters) -> set -> absent (clear).
A set flag stays until cleared (it means something); a clear one with no waiter has no key.
]]

local k, w = KEYS[1], KEYS[2]
local P, op, sid = ARGV[1], ARGV[2], ARGV[3]
local now = now_ms()

local bad = check_kind(k, 'event', nil, {w})
if bad then return bad end

if op == 'is_set' then
  return {'ok', redis.call('HGET', k, 'set') == '1' and 1 or 0, redis.call('LLEN', w)}
end

if op == 'wait' then
  if redis.call('HGET', k, 'set') == '1' then return {'set'} end
  if not alive(P, sid, now) then return {'nosession'} end
  -- Drop waiters whose session ended without cancelling (bounded by the list).
  for _, x in ipairs(redis.call('LRANGE', w, 0, -1)) do
    if not alive(P, sid_of(x), now) then redis.call('LREM', w, 0, x) end
  end
  redis.call('HSET', k, 'kind', 'event', 'set', '0')
  if not redis.call('LPOS', w, ARGV[4]) then redis.call('RPUSH', w, ARGV[4]) end
  redis.call('SADD', P .. 'h:' .. sid, k)
  return {'waiting'}
end

if op == 'cancel' then
  local wid = ARGV[4]
  redis.call('LREM', w, 0, wid)
  local got = take_grant(P, wid)
  if not queued_in(w, sid) then redis.call('SREM', P .. 'h:' .. sid, k) end
  if redis.call('HGET', k, 'set') ~= '1' and redis.call('LLEN', w) == 0 then
    redis.call('DEL', k)
  end
  if got then return {'set'} end
  return {'cancelled'}
end

if op == 'set' then
  redis.call('HSET', k, 'kind', 'event', 'set', '1')
  local keep = tonumber(ARGV[5] or '0')
  if keep > 0 then redis.call('PEXPIRE', k, keep) else redis.call('PERSIST', k) end
  local woken = 0
  for _, x in ipairs(redis.call('LRANGE', w, 0, -1)) do
    local xsid = sid_of(x)
    if alive(P, xsid, now) then
      push_grant(P, x, '1')
      woken = woken + 1
    end
    redis.call('SREM', P .. 'h:' .. xsid, k)
  end
  redis.call('DEL', w)
  return {'ok', woken}
end

if op == 'clear' then
  if redis.call('LLEN', w) == 0 then
    redis.call('DEL', k)
  else
    redis.call('HSET', k, 'set', '0')
    redis.call('PERSIST', k)
  end
  return {'ok'}
end

return redis.error_reply('procsync: unknown event op ' .. tostring(op))
