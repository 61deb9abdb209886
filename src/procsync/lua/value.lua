--[[ value.lua: Value (a shared int, float, str or bytes).

KEYS[1]  k          HASH  kind="value", type=int|float|str|bytes, v=<the value>
ARGV[1]  P
ARGV[2]  op         open | get | set | add | delete
ARGV[3]  type       int | float | str | bytes
ARGV[4]  value      (open: initial value, set) | delta (add)
ARGV[5]  keep_ms    > 0: the value expires this long after its last open/set/add
                    (anonymous values); 0: it stays until deleted
ARGV[6]  op id      (add) an id of this add: sent again after its reply was lost, the
                    add answers its first run's value instead of adding twice (the
                    hash keeps the latest add's id and result: o, ov)

Replies:
  open:   {'ok', v, created 0|1}   creates the value with ARGV[4] if absent
  get:    {'ok', v} | {'absent'}
  set:    {'ok'}
  add:    {'ok', new value}        atomic; int or float only
  delete: {'ok', existed 0|1}
  any op: {'wrongtype', type} | {'conflict', kind, type}
  open, get, add: {'corrupt', 'v', value (false: missing), k}  (a value procsync never
          writes: not an integer for int, not a finite number for float, or missing)

A named Value is state that means something: it stays until deleted. An anonymous
one (random name, handed to children) expires keep_ms after its last write.
]]

local k = KEYS[1]
local op, typ, arg = ARGV[2], ARGV[3], ARGV[4]
local keep = tonumber(ARGV[5] or '0')

local function touch()
  if keep > 0 then redis.call('PEXPIRE', k, keep) end
end

local ktype = redis.call('TYPE', k)['ok']
if ktype ~= 'none' and ktype ~= 'hash' then return {'wrongtype', ktype} end
if ktype == 'hash' then
  local s = redis.call('HMGET', k, 'kind', 'type')
  if s[1] ~= 'value' then return {'wrongtype', 'hash'} end
  if s[2] ~= typ then return {'conflict', 'Value', s[2]} end
  -- The ops that read the value refuse one procsync never writes, changing nothing
  -- (set and delete replace or drop it whole).
  if op == 'open' or op == 'get' or op == 'add' then
    local v = redis.call('HGET', k, 'v')
    local bad = not v
    if not bad and typ == 'int' then
      bad = not string.match(v, '^-?%d+$')
    elseif not bad and typ == 'float' then
      local n = tonumber(v)
      bad = not n or n ~= n or n == math.huge or n == -math.huge or string.find(v, '[xX]') ~= nil
    end
    if bad then return {'corrupt', 'v', v and string.sub(v, 1, 100) or false, k} end
  end
end

if op == 'open' then
  if ktype == 'none' then
    redis.call('HSET', k, 'kind', 'value', 'type', typ, 'v', arg)
    touch()
    return {'ok', arg, 1}
  end
  touch()
  return {'ok', redis.call('HGET', k, 'v'), 0}
end

if op == 'get' then
  if ktype == 'none' then return {'absent'} end
  return {'ok', redis.call('HGET', k, 'v')}
end

if op == 'set' then
  redis.call('HSET', k, 'kind', 'value', 'type', typ, 'v', arg)
  touch()
  return {'ok'}
end

if op == 'add' then
  local id = ARGV[6] or ''
  if id ~= '' and ktype == 'hash' and redis.call('HGET', k, 'o') == id then
    return {'ok', redis.call('HGET', k, 'ov')}
  end
  if ktype == 'none' then redis.call('HSET', k, 'kind', 'value', 'type', typ, 'v', 0) end
  local new
  if typ == 'int' then
    new = redis.call('HINCRBY', k, 'v', arg)
  else
    new = redis.call('HINCRBYFLOAT', k, 'v', arg)
  end
  if id ~= '' then redis.call('HSET', k, 'o', id, 'ov', new) end
  touch()
  return {'ok', new}
end

if op == 'delete' then
  return {'ok', redis.call('DEL', k)}
end

return redis.error_reply('procsync: unknown value op ' .. tostring(op))
