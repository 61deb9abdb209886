--[[ permits.lua: Lock, RLock, Semaphore and BoundedSemaphore.

KEYS[1]  k          HASH  state of the primitive (see _lib.lua "Permit primitives")
KEYS[2]  q          LIST  FIFO queue of waiter ids
KEYS[3]  P.."sessions"
KEYS[4]  P.."fence"
ARGV[1]  P          key prefix of the namespace
ARGV[2]  op         acquire | release | cancel | state
ARGV[3]  kind       lock | rlock | sem | bsem
ARGV[4]  init       initial number of permits (1 for locks)
ARGV[5]  sid        caller's session id
ARGV[6]  wid        caller's waiter id (acquire, cancel)   | n permits (release)
ARGV[7]  blocking   1 / 0 (acquire) | held: 1 if the caller believes it holds permits (release)
ARGV[8]  ref        (release) lock: the waiter id of the grant released; semaphore: an id
                    of this release ('' for neither)

Replies (first element is the status):
  acquire: {'ok', token} | {'busy', now_ms, holders...}
           | {'queued', now_ms, n_holders, holders..., waiters ahead...} | {'nosession'}
           | {'quiet', now_ms, until_ms}: nothing is granted before until_ms, the end of
             a quiet period after lost state (epoch.lua); a blocking caller is queued
  release: {'ok', woken} | {'notheld'} | {'notowner', holders...} | {'overrelease'}
           ({'notheld'} also for a semaphore whose caller lost the permits it held)
  cancel:  {'ok', token}  (granted before the cancel arrived, also a grant whose token
           this waiter's pop took but never delivered) | {'cancelled'}
Every op may be sent again after its reply was lost and answers as its first run did
(see "Retries" in _lib.lua): acquire with the same wid returns the grant it got;
cancel returns a grant to that wid until it is released; release names its grant.
  state:   {'state', v, init, last_token, grants, reclaimed, queue_len, holders...}
  any op:  {'wrongtype', type} | {'conflict', kind, init}
           | {'corrupt', field, value, k} (a field procsync never writes, see check_kind)
           | {'corrupt', P.."fence", value} (a fencing counter that is no token)
A queued waiter's inbox receives its token (digits) when granted, and notices
"w:<sid>|<boot>|<pid>|<start>|<host>" naming a new holder to watch when it becomes the
head of the queue.
holders... is a flat list of (sid, deadline_ms, boot_id, pid, start_ticks, host, permits),
at most 32 holders; "waiters ahead" are the (at most WATCH_AHEAD) waiters queued just
before the caller, in the same format with 0 permits.

States: absent (all free, nobody waits) -> held (v < init or waiters) -> absent.
Invariants: v + sum(h:*) == init for lock, rlock, bsem; a grant always goes to the
head of the queue, never to a newcomer while a live waiter is queued (FIFO, no barging);
a dead session's permits return to v before anyone is granted.
]]

local k, q = KEYS[1], KEYS[2]
local P, op, kind, init, sid = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]

local bad, absent = check_kind(k, kind, init, {q})
if bad then return bad end
if op ~= 'state' then
  -- Any other op may grant: a counter that is not a token is reported, nothing written.
  local fence = corrupt_fence(P)
  if fence then return {'corrupt', P .. 'fence', fence} end
end

-- Fast paths (the uncontended lock): no key means every permit is free and nobody
-- waits, so a grant is one HSET; a lock released by its holder with nobody queued
-- goes back to no key. Neither needs the clock (TIME is the dearest call here).
-- permits_fast.lua, sent before the library, answers these (and the hand-off of a
-- lock to its first waiter) first, with the same replies and state: what follows
-- is the reference it is tested against (scripts.script_source(prelude=False)).
-- The index set, whose type nobody checked, is written before the state key.
if op == 'release' and not absent and (kind == 'lock' or kind == 'rlock') then
  local s = redis.call('HMGET', k, 'h:' .. sid, 'i:' .. sid)
  if s[1] == '1' and ((ARGV[8] or '') == '' or s[2] == ARGV[8]) and redis.call('LLEN', q) == 0 then
    redis.call('SREM', P .. 'h:' .. sid, k)
    redis.call('DEL', k)
    return {'ok', 0}
  end
end

local now = now_ms()

-- A grant is recorded with the waiter id it went to (and, for a semaphore, its token):
-- what an acquire or cancel sent again with that id finds.
local function record_grant(wid, tok)
  redis.call('HSET', k, 'i:' .. sid, wid)
  if kind == 'sem' or kind == 'bsem' then
    redis.call('HSET', k, 'n:' .. sid, string.format('%d', tok))
  end
end

local quiet = nil
if op == 'acquire' then quiet = quiet_until(P, now) end

if op == 'acquire' and absent and init > 0 and not quiet then
  if not alive(P, sid, now) then return {'nosession'} end
  local tok = next_token(P, now)
  redis.call('SADD', P .. 'h:' .. sid, k)
  redis.call('HSET', k, 'kind', kind, 'init', init, 'v', init - 1, 't', string.format('%d', tok),
             'g', 1, 'r', 0, 'h:' .. sid, 1, 'a:' .. sid, now)
  record_grant(ARGV[6], tok)
  return {'ok', tok}
end

local function ensure()
  if redis.call('EXISTS', k) == 0 then
    redis.call('HSET', k, 'kind', kind, 'init', init, 'v', init, 't', 0, 'g', 0, 'r', 0)
  end
end

if op == 'state' then
  if redis.call('EXISTS', k) == 0 then
    return {'state', init, init, 0, 0, 0, 0}
  end
  permits_reap_dead_holders(P, k, now)
  if redis.call('EXISTS', k) == 0 then
    return {'state', init, init, 0, 0, 0, 0}
  end
  local s = redis.call('HMGET', k, 'v', 'init', 't', 'g', 'r')
  local out = {'state', tonumber(s[1]), tonumber(s[2]), tonumber(s[3]), tonumber(s[4]),
               tonumber(s[5]), redis.call('LLEN', q)}
  for _, x in ipairs(holders_info(P, k, 32)) do out[#out + 1] = x end
  return out
end

if op == 'acquire' then
  local wid = ARGV[6]
  local blocking = ARGV[7] == '1'
  if not alive(P, sid, now) then return {'nosession'} end
  ensure()
  permits_reap_dead_holders(P, k, now)
  -- A grant that reached this waiter's inbox before this call (the reaping just now,
  -- or a release while its pop was timing out) is its answer: never queue it again.
  local pending = take_grant(P, wid)
  if pending then return {'ok', tonumber(pending)} end
  ensure()
  -- Sent again after its reply was lost: the grant it got then is its answer.
  local before = grant_of(k, sid, wid)
  if before then return {'ok', before} end
  if not redis.call('LPOS', q, wid) then
    local v = tonumber(redis.call('HGET', k, 'v'))
    if v > 0 and redis.call('LLEN', q) == 0 and not quiet then
      local tok = next_token(P, now)
      if redis.call('HINCRBY', k, 'h:' .. sid, 1) == 1 then redis.call('HSET', k, 'a:' .. sid, now) end
      redis.call('HSET', k, 'v', v - 1, 't', string.format('%d', tok))
      redis.call('HINCRBY', k, 'g', 1)
      redis.call('SADD', P .. 'h:' .. sid, k)
      record_grant(wid, tok)
      return {'ok', tok}
    end
    if not blocking and quiet then
      permits_maybe_delete(P, k)
      return {'quiet', now, quiet}
    end
    if not blocking then
      local out = {'busy', now}
      for _, x in ipairs(holders_info(P, k, 32)) do out[#out + 1] = x end
      permits_maybe_delete(P, k)
      return out
    end
    redis.call('RPUSH', q, wid)
    redis.call('SADD', P .. 'h:' .. sid, k)
  end
  local granted = permits_dispatch(P, k, now)
  if granted[wid] then
    redis.call('DEL', P .. 'in:' .. wid)
    return {'ok', granted[wid]}
  end
  if quiet then return {'quiet', now, quiet} end
  -- The holders, then the few waiters just ahead: a waiter watches them all, so a
  -- crash of any of them on its host is noticed at once, not at a lease end.
  local hs = holders_info(P, k, 32)
  local out = {'queued', now, #hs / 7}
  for _, x in ipairs(hs) do out[#out + 1] = x end
  local pos = redis.call('LPOS', q, wid)
  if pos and pos > 0 then
    local lo = pos - WATCH_AHEAD
    if lo < 0 then lo = 0 end
    for _, w in ipairs(redis.call('LRANGE', q, lo, pos - 1)) do
      for _, x in ipairs(session_info(P, sid_of(w), 0)) do out[#out + 1] = x end
    end
  end
  return out
end

if op == 'cancel' then
  local wid = ARGV[6]
  redis.call('LREM', q, 0, wid)
  local tok = take_grant(P, wid)
  if tok then return {'ok', tonumber(tok)} end
  if redis.call('EXISTS', k) == 1 then
    -- A grant to this very waiter whose token was popped but never reached it (its
    -- connection broke, or an interrupt came, while the pop's reply was on the way),
    -- or whose acquire's reply was lost: the hold is the caller's, to give back.
    local before = grant_of(k, sid, wid)
    if before then return {'ok', before} end
    if not redis.call('HGET', k, 'h:' .. sid) and not queued_in(q, sid) then
      redis.call('SREM', P .. 'h:' .. sid, k)
    end
    permits_dispatch(P, k, now)
    permits_maybe_delete(P, k)
  end
  return {'cancelled'}
end

if op == 'release' then
  -- A caller that believes it holds permits, but holds none here, lost them (its
  -- session ended) or released them already (its session lives): permits_release
  -- tells which, instead of treating it as a release by a non-holder.
  return permits_release(P, k, kind, init, sid, tonumber(ARGV[6]), now, ARGV[8] or '',
                         ARGV[7] == '1')
end

return redis.error_reply('procsync: unknown permits op ' .. tostring(op))
