--[[ epoch.lua: has this namespace's state been lost, or the server restarted, since
it was last looked at? Run by every client before the first script call on each new
connection (procsync.backend.client), so after a restart or a failover the first
client back -- before any grant -- starts the quiet period.

KEYS[1]  P.."epoch"   HASH  run (the run id of the server the state was last seen on),
                            since (ms, when it was seen first), ttl (the longest
                            session ttl the namespace has seen, ms)
KEYS[2]  P.."fence"   STRING the fencing counter
ARGV[1]  P
ARGV[2]  ttl_ms       the caller's session ttl
ARGV[3]  born         the value of the key procsync:born: the run id of a server that
                      started empty with nothing ever granted from it before (written
                      by whoever started it so: procsync.testing, the embedded server)

Reply: {'ok', quiet_until_ms (0: none), lost 0|1, restarted 0|1}

The rule (Chubby's after a master failover): when the state may have been lost -- no
epoch (a restart without data, a flush), or an epoch of another server run (a restart
that kept its data up to its last write, a replica promoted with what it had) --
nothing is granted until every lease the old state could have granted has run out:
until the server's start (for a replica promoted to primary: now, as its old primary
may have granted until it was replaced) plus the longest ttl, plus a margin (a quarter
of it and 250 ms, for an old holder's heartbeat that runs late). A holder's client-side
deadline is at most one ttl after its last renewal, which the old server saw before it
went away, so by then every old holder has been told it lost its hold; new holders
start after.

The quiet period lives in the fencing counter: it is pushed to (quiet_until + 1000) *
1000, ahead of the clock in microseconds, and a grant whose token would be more than a
second ahead of the clock is refused (quiet_until in _lib.lua). So it costs the grants
nothing, and every token after it is above every token before it.
]]

local QUIET_MARGIN_MS = 250

local info = redis.call('INFO', 'server')
local run = string.match(info, 'run_id:(%w+)') or ''
local up = tonumber(string.match(info, 'uptime_in_seconds:(%d+)') or '0')
local now = now_ms()
-- A replica promoted to primary (it has its old primary's history: a second
-- replication offset) may have been behind a primary that granted until just now:
-- its own start says nothing, the old state's leases run from now.
local repl = redis.call('INFO', 'replication')
local promoted = (string.match(repl, 'second_repl_offset:(%-?%d+)') or '-1') ~= '-1'
local start = now - up * 1000
if promoted then start = now end
local e = redis.call('HMGET', KEYS[1], 'run', 'ttl')
if e[1] == run then return {'ok', 0, 0, 0} end
local ttl = tonumber(ARGV[2])
local seen = tonumber(e[2] or '0') or 0
if seen > ttl then ttl = seen end
local lost = e[1] and 0 or 1
local quiet = 0
if not (lost == 1 and ARGV[3] == run) then
  -- The state may have been granted from before this server started (was promoted).
  -- A margin on top: an old holder's heartbeat thread may run a little late (a loaded
  -- machine), and it must have declared its hold lost before anyone else is granted.
  quiet = start + ttl + QUIET_MARGIN_MS + math.floor(ttl / 4)
end
redis.call('HSET', KEYS[1], 'run', run, 'since', now, 'ttl', ttl)
if quiet > now then
  local ahead = (quiet + 1000) * 1000
  local c = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
  if c < ahead then redis.call('SET', KEYS[2], string.format('%d', ahead)) end
else
  quiet = 0
end
return {'ok', quiet, lost, e[1] and 1 or 0}
