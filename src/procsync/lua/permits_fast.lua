--[[ permits_fast.lua: the common cases of permits.lua, run BEFORE the shared library.

scripts.py sends this file first, then _lib.lua, then permits.lua (same KEYS and ARGV:
see permits.lua's header). Every EVALSHA runs the whole chunk, so _lib.lua's
`local function` statements create their closures on every call; the cases below need
none of them, so they are answered before the library is even defined:

  acquire, any kind, no state key and no queue key (everything free, nobody waits):
      EXISTS, TIME, ZSCORE, GET + SET (the token), SADD, HSET
  release of a lock / rlock by its holder (the grant it names), nobody queued:
      HMGET, LRANGE, SREM, DEL
  release of a semaphore by its only holder (alive), nobody queued:
      HMGET, LLEN, TIME, ZSCORE, SREM, DEL
  release of a lock / rlock by its (alive) holder with waiters queued, the hand-off
  to the first waiter whose session is alive (dead ones ahead of it are dropped):
      HMGET, LRANGE, TIME, ZSCORE (holder), ZSCORE per waiter session looked at,
      GET + SET, SADD, SREM, LTRIM, HDEL, HSET, DEL + LPUSH + PEXPIRE (the grant),
      HMGET + LPUSH + PEXPIRE (the watch notice to the new head, if any)
      (the full script: about twice as many calls)

Contract: each case gives exactly the reply and leaves exactly the state (every hash
field and value, index sets, queue, inboxes and their expiry, fencing counter) that
the full script gives for the same call; tests/test_permits_script.py checks this by
running random call sequences through both. Any other call falls through to the full
script, and a call that falls through has written nothing.

Key types. The state key k and the queue q are the keys a name reaches: they are only
written once known to be of the right type (EXISTS k q == 0: neither exists; a hash
with our "kind" field; LRANGE / LLEN without an error), else the call falls through
and the full script answers {'wrongtype', type} without writing. Index sets, inboxes,
session hashes, the fencing counter and the session registry have names no primitive
name can produce; the full script does not check their types either: a foreign value
there is the same Redis error here as there. Reads come before any write, and the
writes that could meet such a value before the others: the counter is read and checked
first (a value that is not a token falls through: the full script reports it), then
the index sets and the new head's inbox, the index set that loses an entry last. So
such an error leaves the primitive's state, queue and grant untouched; at most (a
hand-off) the new holder's index set or the head's inbox got their additions.

Mirrors of _lib.lua (keep in step): alive() is "deadline > now", now_ms(), sid_of(),
queued_in(), identity_notice(), INBOX_TTL_MS, next_token() and corrupt_fence() (the
counter is a token below 2^53; the next is one more, at least now_ms * 1000; more
than QUIET_SLACK_US ahead of the clock it is a quiet period: quiet_until()),
permits_dispatch() for one free permit, record_grant() ("i:" and, for a semaphore,
"n:" of the grant).
]]
do
  local op, kind = ARGV[2], ARGV[3]
  local lockish = kind == 'lock' or kind == 'rlock'
  local semish = kind == 'sem' or kind == 'bsem'
  if op == 'acquire' or (op == 'release' and (lockish or semish)) then
    local k, q = KEYS[1], KEYS[2]
    local P, init, sid = ARGV[1], tonumber(ARGV[4]), ARGV[5]
    local sessions = P .. 'sessions'
    local f = P .. 'fence'
    -- The next fencing token at server time now (ms), or nil when the counter holds
    -- something that is not a token, or is in a quiet period (then the full script
    -- answers).
    local function token_after(now)
      local c = tonumber(redis.call('GET', f) or '0')
      if not c or c < 0 or c ~= math.floor(c) or c >= 9007199254740991 then return nil end
      local tok = c + 1
      if tok > now * 1000 + 1000000 then return nil end
      if tok < now * 1000 then tok = now * 1000 end
      return tok
    end

    if op == 'acquire' then
      -- (no state key means nobody waits: a queue key then would be foreign, and the
      -- full script checks its type)
      if init and init > 0 and redis.call('EXISTS', k, q) == 0 then
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        local d = redis.call('ZSCORE', sessions, sid)
        local tok = token_after(now)
        if tok then
          if not (d and tonumber(d) > now) then return {'nosession'} end
          local ts = string.format('%d', tok)
          redis.call('SET', f, ts)
          redis.call('SADD', P .. 'h:' .. sid, k)
          if semish then
            redis.call('HSET', k, 'kind', kind, 'init', init, 'v', init - 1, 't', ts, 'g', 1,
                       'r', 0, 'h:' .. sid, 1, 'a:' .. sid, now, 'i:' .. sid, ARGV[6], 'n:' .. sid, ts)
          else
            redis.call('HSET', k, 'kind', kind, 'init', init, 'v', init - 1, 't', ts, 'g', 1,
                       'r', 0, 'h:' .. sid, 1, 'a:' .. sid, now, 'i:' .. sid, ARGV[6])
          end
          return {'ok', tok}
        end
      end

    else  -- release
      local s = redis.pcall('HMGET', k, 'kind', 'init', 'h:' .. sid, 'v', 'g', 'i:' .. sid)
      -- (an error reply, a key of another type, has no s[1])
      -- (a lock's release names the grant it ends: ARGV[8], the waiter id in "i:")
      if s[1] == kind and (not init or tonumber(s[2]) == init) and s[3] == '1'
         and (semish or (ARGV[8] or '') == '' or ARGV[8] == s[6]) then
        -- The queue's length (nil if q is not a list): a lock reads the whole queue at
        -- once, since a hand-off needs all of it.
        local queued, L
        if lockish then
          L = redis.pcall('LRANGE', q, 0, -1)
          if not L.err then queued = #L end
        else
          queued = redis.pcall('LLEN', q)
          if type(queued) ~= 'number' then queued = nil end
        end
        local hk = P .. 'h:' .. sid

        if queued == 0 and lockish then
          -- As permits.lua's own fast path: the holder gives the lock back, no key.
          redis.call('SREM', hk, k)
          redis.call('DEL', k)
          return {'ok', 0}
        end

        -- Only when the caller is the only holder is the full script's reaping of
        -- dead holders about the caller alone (and a dead caller falls through: the
        -- full script reaps its session). A lock with v == 0 is held by the caller
        -- alone (v + sum(h:*) == init == 1); a semaphore may have been given extra
        -- permits, so its fields are counted: the base six plus the caller's h:, a:,
        -- i: and n: (no o:, a release id kept while other permits were out).
        local handoff = lockish and queued and queued > 0
          and tonumber(s[2]) == 1 and s[4] == '0' and tonumber(s[5]) ~= nil
        local sem_last = semish and queued == 0 and init and tonumber(s[4]) == init - 1
          and redis.call('HLEN', k) == 10
        if tonumber(ARGV[6]) == 1 and (handoff or sem_last) then
          local t = redis.call('TIME')
          local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
          local d = redis.call('ZSCORE', sessions, sid)
          local tok = handoff and token_after(now)  -- (nil: a counter the full script reports)
          if d and tonumber(d) > now and (sem_last or tok) then

            if sem_last then  -- a semaphore's last permit in use back, nobody waits
              redis.call('SREM', hk, k)
              redis.call('DEL', k)
              return {'ok', 0}
            end

            -- The hand-off. One read of the queue serves all the full script reads it
            -- for: whether the caller still waits in it (another thread of its
            -- process: queued_in), the first waiter whose session is alive
            -- (permits_dispatch pops and drops the dead ones before it) and the new
            -- head after it.
            local prefix = sid .. '/'
            local mine = false
            local live = {[sid] = true}
            local gi, w, wsid
            for i = 1, #L do
              local e = L[i]
              if string.sub(e, 1, #prefix) == prefix then mine = true end
              if not gi then
                local j = string.find(e, '/', 1, true)
                local es = e
                if j then es = string.sub(e, 1, j - 1) end
                local ok = live[es]
                if ok == nil then
                  local ed = redis.call('ZSCORE', sessions, es)
                  ok = (ed and tonumber(ed) > now) and true or false
                  live[es] = ok
                end
                if ok then gi, w, wsid = i, e, es end
              end
            end

            if not gi then
              -- Every waiter's session is dead: all are dropped, the lock is free and
              -- nobody waits, so its key goes (permits_maybe_delete). The caller has no
              -- entry (it is alive: it would have been served).
              redis.call('SREM', hk, k)
              redis.call('DEL', k, q)
              return {'ok', 0}
            end

            -- The new head of the queue is told to watch the new holder.
            local head = L[gi + 1]
            local notice
            if head then
              local id = redis.call('HMGET', P .. 's:' .. wsid, 'boot', 'pid', 'start', 'host')
              notice = 'w:' .. wsid .. '|' .. (id[1] or '') .. '|' .. (id[2] or '0') .. '|'
                .. (id[3] or '0') .. '|' .. (id[4] or '')
            end
            -- Writes to keys whose type is not checked first (see the header).
            local ts = string.format('%d', tok)
            redis.call('SET', f, ts)
            if wsid ~= sid then redis.call('SADD', P .. 'h:' .. wsid, k) end
            if head then
              local hb = P .. 'in:' .. head
              redis.call('LPUSH', hb, notice)
              redis.call('PEXPIRE', hb, 120000)
            end
            if wsid ~= sid and not mine then redis.call('SREM', hk, k) end
            -- Keys known to be of the right type (k, q) or emptied first (the inbox).
            redis.call('LTRIM', q, gi, -1)  -- pops the dead waiters and the served one
            if wsid ~= sid then redis.call('HDEL', k, 'h:' .. sid, 'a:' .. sid, 'i:' .. sid) end
            redis.call('HSET', k, 'h:' .. wsid, 1, 'a:' .. wsid, now, 'i:' .. wsid, w,
                       'v', 0, 't', ts, 'g', string.format('%d', tonumber(s[5]) + 1))
            local inbox = P .. 'in:' .. w
            redis.call('DEL', inbox)  -- watch notices are stale once granted
            redis.call('LPUSH', inbox, ts)
            redis.call('PEXPIRE', inbox, 120000)
            return {'ok', 1}
          end
        end
      end
    end
  end
end
