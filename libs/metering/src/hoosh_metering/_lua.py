"""The budget's Lua: every script runs atomically in one slot, on keys that share the
hash tag ``{root}`` of one pool tree (KEYS[1] is always one of them, so a cluster
client routes the EVALSHA; the script builds the other names with the same tag).

Conventions: ARGV[1] is the tree's key base ``<prefix>{<root>}:``. Numbers are Lua
doubles, so every count stays below 2**53 and is written back with ``%d``: every
counter saturates at MAX_AMOUNT (2**53 - 1) and 0, whatever is added to it, so no
value is ever formatted above 2**53 - 1 (``%d`` of a double past 2**63 wraps
negative) and none is stored below 0. Replies carry counters as strings (exact) and
statuses as the first element.

A *chain* argument is one string of ``name period tz start`` quadruples joined by
``;``, leaf first: the caller's picture of the pool and its ancestors, with each
pool's current period start (0 for "none") computed by the client in the pool's time
zone. Numbers travel packed the same way (space-separated) where a script takes many:
each argument costs the client as much to encode as the script costs to run.

A *starts* argument is the tree's period starts by period and time zone: ``period tz
start`` triples joined by ``;`` (one per distinct pair among the tree's pools; '' when
no pool of the tree has a period). Scripts that settle expired leases take it, so
that each pool of an expired reservation's chain rolls into the current period before
the charge lands, like the chain's own pools do.

Every pool has an incarnation ``inc`` (a per-tree sequence number given at creation;
0 for pools made before incarnations existed); a reservation records the incarnation
of each pool of its chain (``incs``) and is settled only in pools whose incarnation
still matches, so a pool deleted and created again under the same name is a new pool
that no old reservation can touch.

A period start is trusted only up to ``CLOCK_TOLERANCE_MS`` past the Redis clock: a
replica whose clock runs ahead cannot start a period early.
"""

from __future__ import annotations

PRELUDE = r"""
local base = ARGV[1]
local lease_key = base .. 'lease'
local MEGA = 1000000
local MAX = 9007199254740991  -- 2**53 - 1: every integer up to it is exact in a double
local CLOCK_TOLERANCE_MS = 2000
-- Formats an integer; never above MAX (a double past 2**63 would wrap negative).
local function int(x)
  if x > MAX then x = MAX end
  return string.format('%d', x)
end
-- A counter's value: within [0, MAX].
local function clamp(x)
  if x < 0 then return 0 end
  if x > MAX then return MAX end
  return x
end
local function num(x) return tonumber(x) or 0 end
local function pool_key(name) return base .. 'pool:' .. name end
local function res_key(id) return base .. 'res:' .. id end
local clock_ms = nil
local function now_ms()
  if not clock_ms then
    local t = redis.call('TIME')
    clock_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return clock_ms
end

-- Exact integer division of non-negative integers below 2**53 (fmod is exact).
local function divmod(a, b)
  local r = math.fmod(a, b)
  return (a - r) / b, r
end

-- ceil(tokens * price / 1e6) without forming tokens * price (it may pass 2**53).
local function cost(tokens, price)
  if tokens <= 0 or price <= 0 then return 0 end
  local q, r = divmod(tokens, MEGA)
  local rq, rr = divmod(r * price, MEGA)
  local c = q * price + rq
  if rr > 0 then c = c + 1 end
  return c
end

-- The most tokens whose cost at `price` fits in `budget` micro-dollars; -1 if none.
local function affordable(budget, price)
  if budget < 0 then return -1 end
  local q, r = divmod(budget, price)
  local extra = divmod(r * MEGA, price)
  return q * MEGA + extra
end

-- Pools are read once per script into `cache` (one HMGET each), changed in memory
-- and written back by done() (one HSET each): a chain costs two calls per level.
local FIELDS = {'capacity', 'used', 'reserved', 'parent', 'period', 'tz', 'cap_usd', 'used_usd', 'reserved_usd',
  'period_start', 'inc'}
local cache = {}

local function get(name)
  local s = cache[name]
  if s ~= nil then return s or nil end
  local v = redis.call('HMGET', pool_key(name), unpack(FIELDS))
  if not v[1] then
    cache[name] = false
    return nil
  end
  s = {name = name, capacity = num(v[1]), used = clamp(num(v[2])), reserved = clamp(num(v[3])), parent = v[4] or '',
    period = v[5] or 'none', tz = v[6] or 'UTC', cap_usd = v[7] and num(v[7]) or nil, used_usd = clamp(num(v[8])),
    reserved_usd = clamp(num(v[9])), period_start = num(v[10]), inc = num(v[11]), dirty = {}}
  cache[name] = s
  return s
end

local function put(s, field, value)
  s[field] = value
  s.dirty[field] = true
end

-- Saturating change of a counter: never below 0, never above MAX.
local function add(s, field, n)
  if n == 0 then return end
  put(s, field, clamp(s[field] + n))
end

-- Write back what changed, then reply. Every script ends here.
local function done(reply)
  for name, s in pairs(cache) do
    if s then
      local args = {}
      for field in pairs(s.dirty) do
        args[#args + 1] = field
        args[#args + 1] = int(s[field])
      end
      if #args > 0 then redis.call('HSET', pool_key(name), unpack(args)) end
      s.dirty = {}
    end
  end
  return reply
end

-- The client's picture of a pool: name, capacity, used, reserved, parent, period,
-- tz, cap_usd ('' = none), used_usd, reserved_usd, period_start. false if absent.
local function view(name)
  local s = name and get(name)
  if not s then return false end
  local cap = ''
  if s.cap_usd then cap = int(s.cap_usd) end
  return {s.name, int(s.capacity), int(s.used), int(s.reserved), s.parent, s.period, s.tz, cap, int(s.used_usd),
    int(s.reserved_usd), int(s.period_start)}
end

local function parse_chain(packed)
  local chain = {}
  for name, period, tz, start in string.gmatch(packed, '([^ ;]+) ([^ ;]+) ([^ ;]+) (%d+)') do
    chain[#chain + 1] = {name = name, period = period, tz = tz, start = tonumber(start)}
  end
  return chain
end

local function numbers(packed)
  local out = {}
  for x in string.gmatch(packed, '%S+') do out[#out + 1] = tonumber(x) end
  return out
end

local function split(csv)
  local out = {}
  for name in string.gmatch(csv, '[^,]+') do out[#out + 1] = name end
  return out
end

-- Does the caller's chain match the store (links, periods, time zones)?
-- nil when it does; 'not_found' or 'stale' (the caller reloads its directory) else.
local function verify(chain)
  for i, c in ipairs(chain) do
    local s = get(c.name)
    if not s then return 'not_found' end
    local want = ''
    if chain[i + 1] then want = chain[i + 1].name end
    if s.parent ~= want or s.period ~= c.period or s.tz ~= c.tz then return 'stale' end
  end
  return nil
end

-- Start a new period when the caller's period start is later than the stored one.
-- used restarts at 0 and prev_* keep the ended period; reserved is untouched, so
-- reservations in flight commit into the period in which they end. Only forward, and
-- never to a start later than the Redis clock (plus a small tolerance): a replica
-- whose clock runs ahead cannot end a period early.
local function roll(s, start)
  if not s or s.period == 'none' or not start or start <= s.period_start then return end
  if start > now_ms() + CLOCK_TOLERANCE_MS then return end
  put(s, 'prev_used', s.used)
  put(s, 'prev_used_usd', s.used_usd)
  put(s, 'prev_period_start', s.period_start)
  put(s, 'used', 0)
  put(s, 'used_usd', 0)
  put(s, 'period_start', start)
end

local function roll_chain(chain)
  for _, c in ipairs(chain) do roll(get(c.name), c.start) end
end

-- The tree's period starts by 'period tz' (see the module's docstring).
local starts = {}
local function parse_starts(packed)
  for period, tz, start in string.gmatch(packed or '', '([^ ;]+) ([^ ;]+) (%d+)') do
    starts[period .. ' ' .. tz] = tonumber(start)
  end
end

local function read_res(id)
  local r = redis.call('HMGET', res_key(id), 'chain', 'tokens', 'usd', 'state', 'expires', 'owner', 'kind',
    'on_expiry', 'completion', 'incs')
  if not r[1] then return nil end
  return {chain = r[1], tokens = num(r[2]), usd = num(r[3]), state = r[4], expires = num(r[5]),
    owner = r[6] or '', kind = r[7] or '', on_expiry = r[8] or 'commit', completion = num(r[9]), incs = r[10]}
end

-- Take a reservation out of every pool of its chain that still exists as the pool it
-- was reserved in (same incarnation), charging `charge` tokens and `charge_usd`
-- micro-dollars as used. Each such pool first rolls into the current period (when
-- the caller passed the tree's starts), so the charge lands in the period in which
-- the reservation ends.
local function settle(rec, charge, charge_usd)
  local incs = rec.incs and numbers(string.gsub(rec.incs, ',', ' '))
  for i, name in ipairs(split(rec.chain)) do
    local s = get(name)
    if s and (not incs or incs[i] == s.inc) then
      roll(s, starts[s.period .. ' ' .. s.tz])
      add(s, 'reserved', -rec.tokens)
      add(s, 'reserved_usd', -rec.usd)
      add(s, 'used', charge)
      add(s, 'used_usd', charge_usd)
    end
  end
end

-- The ledger: per tree and UTC day (one hash, kept LEDGER_TTL seconds), what each
-- charge cost, by provider, model, pool and key: fields '<provider>\t<model>\t<pool>\t
-- <key>\t<metric>', metric r(equests) p(rompt) c(ompletion) u(sd micros). pcall: a
-- counter past int64 must never stop the charge itself from landing.
local LEDGER_TTL = 400 * 86400
local function ledger(pool, key, provider, model, prompt, completion, usd)
  local k = base .. 'costs:' .. math.floor(now_ms() / 86400000)
  local line = provider .. '\t' .. model .. '\t' .. pool .. '\t' .. key .. '\t'
  -- A day's hash is created by the first request of its first line: only then is an
  -- expiry due (NX keeps an existing one).
  if redis.pcall('HINCRBY', k, line .. 'r', 1) == 1 then redis.call('EXPIRE', k, LEDGER_TTL, 'NX') end
  if prompt > 0 then redis.pcall('HINCRBY', k, line .. 'p', int(prompt)) end
  if completion > 0 then redis.pcall('HINCRBY', k, line .. 'c', int(completion)) end
  if usd > 0 then redis.pcall('HINCRBY', k, line .. 'u', int(usd)) end
end

-- End an active reservation once; its record lingers ended_ttl seconds.
local function finish(id, rec, state, charge, charge_usd, ended_ttl)
  settle(rec, charge, charge_usd)
  redis.call('ZREM', lease_key, id)
  redis.call('HSET', res_key(id), 'state', state, 'charged', int(charge))
  redis.call('EXPIRE', res_key(id), int(ended_ttl))
end

-- A lease ran out (its holder died or hung): settle by the reservation's policy.
-- commit: the provider may have billed it, charge it all; release: give it back.
local function expire(id, rec, ended_ttl)
  if rec.on_expiry == 'release' then
    finish(id, rec, 'expired', 0, 0, ended_ttl)
  else
    finish(id, rec, 'expired', rec.tokens, rec.usd, ended_ttl)
    ledger(split(rec.chain)[1], rec.owner, '', '', rec.tokens, 0, rec.usd)
  end
end

-- Settle up to `limit` expired leases of this tree; returns how many were ended.
local function reclaim(now, ended_ttl, limit)
  local ids = redis.call('ZRANGEBYSCORE', lease_key, '-inf', int(now), 'LIMIT', 0, int(limit))
  local ended = 0
  for _, id in ipairs(ids) do
    local rec = read_res(id)
    if rec and rec.state == 'active' then
      expire(id, rec, ended_ttl)
      ended = ended + 1
    else
      redis.call('ZREM', lease_key, id)
    end
  end
  return ended
end

local function contains(csv, name)
  return string.find(',' .. csv .. ',', ',' .. name .. ',', 1, true) ~= nil
end
"""

# KEYS[1]: the tree's lease key. ARGV: base, id, owner, kind, on_expiry, numbers
# (prompt completion min_completion lease_ms ended_ttl limit default_retry
# input_price output_price), chain, starts.
RESERVE = (
    PRELUDE
    + r"""
local id, owner, kind, on_expiry = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local n = numbers(ARGV[6])
local prompt, completion, min_completion, lease_ms = n[1], n[2], n[3], n[4]
local ended_ttl, limit, default_retry, in_price, out_price = n[5], n[6], n[7], n[8], n[9]
local chain = parse_chain(ARGV[7])
parse_starts(ARGV[8])
local now = now_ms()
local bad = verify(chain)
if bad then return {bad} end
roll_chain(chain)
reclaim(now, ended_ttl, limit)

-- Idempotency: an active reservation with this id is returned as it is.
local rk = res_key(id)
local cur = read_res(id)
if cur and cur.state == 'active' then
  if cur.owner ~= owner then return done({'not_owner'}) end
  if cur.expires > now then
    local leaf = split(cur.chain)[1]
    return done({'existing', view(leaf), int(cur.tokens), int(cur.expires), int(cur.usd), cur.chain,
      int(cur.completion)})
  end
  expire(id, cur, ended_ttl)
end

-- How many completion tokens can every pool of the chain afford, in tokens and
-- (where it has a money cap) in micro-dollars? The least of them, and where.
local cost_in = cost(prompt, in_price)
local best, tight, tight_reason = nil, nil, 'tokens'
for i, c in ipairs(chain) do
  local s = get(c.name)
  local afford = s.capacity - s.used - s.reserved - prompt
  local reason = 'tokens'
  if s.cap_usd then
    local room_usd = s.cap_usd - s.used_usd - s.reserved_usd - cost_in
    local afford_usd = completion
    if room_usd < 0 then
      afford_usd = -1
    elseif out_price > 0 then
      afford_usd = affordable(room_usd, out_price)
    end
    if afford_usd < afford then
      afford = afford_usd
      reason = 'usd'
    end
  end
  if best == nil or afford < best then
    best, tight, tight_reason = afford, i, reason
  end
end

local granted = math.min(completion, best)
if granted >= min_completion then
  local tokens = prompt + granted
  local usd = cost_in + cost(granted, out_price)
  local expires = now + lease_ms
  local names, incs = {}, {}
  for i, c in ipairs(chain) do
    local s = get(c.name)
    add(s, 'reserved', tokens)
    add(s, 'reserved_usd', usd)
    names[i] = c.name
    incs[i] = int(s.inc)
  end
  local csv = table.concat(names, ',')
  if cur then redis.call('DEL', rk) end  -- an ended record reusing this id
  redis.call('HSET', rk, 'chain', csv, 'tokens', int(tokens), 'usd', int(usd), 'completion', int(granted),
    'state', 'active', 'expires', int(expires), 'owner', owner, 'kind', kind, 'on_expiry', on_expiry,
    'incs', table.concat(incs, ','))
  redis.call('ZADD', lease_key, int(expires), id)
  return done({'ok', view(chain[1].name), int(tokens), int(expires), int(usd), csv, int(granted)})
end

-- Not enough in the tightest pool: when would its leases, ending in order, cover it?
local s = get(chain[tight].name)
local need, raw, held, field
if tight_reason == 'usd' then
  need = cost_in + cost(min_completion, out_price)
  raw = s.cap_usd - s.used_usd - s.reserved_usd
  held, field = s.reserved_usd, 'usd'
else
  need = prompt + min_completion
  raw = s.capacity - s.used - s.reserved
  held, field = s.reserved, 'tokens'
end
local retry, from_leases = default_retry, 0
if raw + held >= need then
  local leases = redis.call('ZRANGE', lease_key, 0, int(limit - 1), 'WITHSCORES')
  local freed = 0
  for i = 1, #leases, 2 do
    local r = redis.call('HMGET', res_key(leases[i]), 'chain', field)
    if r[1] and contains(r[1], s.name) then
      freed = freed + num(r[2])
      if raw + freed >= need then
        retry = math.max(1, math.ceil((tonumber(leases[i + 1]) - now) / 1000))
        from_leases = 1
        break
      end
    end
  end
end
return done({'exhausted', s.name, tight_reason, int(need), int(math.max(0, raw)), int(retry), from_leases})
"""
)

# KEYS[1]: the tree's lease key. ARGV: base, id, mode (commit|release), numbers
# (used used_usd ended_ttl), has_owner, owner, has_kind, kind, chain, line. line:
# 'provider model prompt completion' for the ledger ('' when the caller has none:
# the whole charge is then prompt, under provider and model '').
END = (
    PRELUDE
    + r"""
local id, mode = ARGV[2], ARGV[3]
local n = numbers(ARGV[4])
local used, used_usd, ended_ttl = n[1], n[2], n[3]
local has_owner, owner, has_kind, kind = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local chain = parse_chain(ARGV[9])
local line_provider, line_model, line_prompt, line_completion = string.match(ARGV[10] or '',
  '^(%S*) (%S*) (%d+) (%d+)$')
local now = now_ms()
local rec = read_res(id)
if not rec then return {'unknown', false} end
if (has_owner == '1' and rec.owner ~= owner) or (has_kind == '1' and rec.kind ~= kind) then
  return {'not_owner', false}
end
local leaf = split(rec.chain)[1]
if rec.state ~= 'active' then return {rec.state, view(leaf)} end

-- Roll the periods first, so the usage lands in the period in which it ends.
local given = {}
for _, c in ipairs(chain) do given[c.name] = c end
for _, name in ipairs(split(rec.chain)) do
  if not given[name] and get(name) then return {'chain', rec.chain} end
end
for _, c in ipairs(chain) do
  local s = get(c.name)
  if s then
    if s.period ~= c.period or s.tz ~= c.tz then return {'stale', false} end
    roll(s, c.start)
  end
end

if rec.expires <= now then
  expire(id, rec, ended_ttl)
  return done({'expired', view(leaf)})
end
if mode == 'commit' then
  if rec.kind == 'manual' then
    -- Self-reported usage (/v1/tokens/report) can charge at most what was reserved.
    used, used_usd = math.min(used, rec.tokens), math.min(used_usd, rec.usd)
  end
  -- Otherwise metering is honest: usage may exceed the reservation and even the
  -- capacity (the counters saturate at MAX).
  finish(id, rec, 'committed', used, used_usd, ended_ttl)
  if line_provider then
    ledger(leaf, rec.owner, line_provider, line_model, tonumber(line_prompt), tonumber(line_completion), used_usd)
  elseif used > 0 or used_usd > 0 then  -- a commit of nothing without a line is no charge
    ledger(leaf, rec.owner, '', '', used, 0, used_usd)
  end
else
  finish(id, rec, 'released', 0, 0, ended_ttl)
end
return done({'ok', view(leaf)})
"""
)

# KEYS[1]: the tree's lease key. ARGV: base, id, lease_ms, ended_ttl, starts.
# Returns {'ok', expires} or {state}.
RENEW = (
    PRELUDE
    + r"""
local id, lease_ms, ended_ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
parse_starts(ARGV[5])
local now = now_ms()
local rec = read_res(id)
if not rec then return {'unknown'} end
if rec.state ~= 'active' then return {rec.state} end
if rec.expires <= now then
  expire(id, rec, ended_ttl)
  return done({'expired'})
end
local expires = now + lease_ms
if expires > rec.expires then
  redis.call('HSET', res_key(id), 'expires', int(expires))
  redis.call('ZADD', lease_key, int(expires), id)
else
  expires = rec.expires
end
return {'ok', int(expires)}
"""
)

# KEYS[1]: the tree's lease key. ARGV: base, actual, usd, chain, report id, ttl.
# A report id seen within ttl seconds is not counted again (a retried call).
REPORT = (
    PRELUDE
    + r"""
local actual, usd = tonumber(ARGV[2]), tonumber(ARGV[3])
local chain = parse_chain(ARGV[4])
local report_id, ttl = ARGV[5], tonumber(ARGV[6])
local bad = verify(chain)
if bad then return {bad} end
roll_chain(chain)
if report_id ~= '' and not redis.call('SET', base .. 'report:' .. report_id, '1', 'NX', 'EX', int(ttl)) then
  return done({'ok', view(chain[1].name)})
end
for _, c in ipairs(chain) do
  local s = get(c.name)
  add(s, 'used', actual)
  add(s, 'used_usd', usd)
end
ledger(chain[1].name, '', '', '', actual, 0, usd)
return done({'ok', view(chain[1].name)})
"""
)

# KEYS[1]: the tree's lease key. ARGV: base, ended_ttl, limit, chain, starts.
# Reclaims expired leases and rolls periods first, so the views are current.
VIEW_CHAIN = (
    PRELUDE
    + r"""
local ended_ttl, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local chain = parse_chain(ARGV[4])
parse_starts(ARGV[5])
local bad = verify(chain)
if bad then return {bad} end
roll_chain(chain)
reclaim(now_ms(), ended_ttl, limit)
local out = {'ok'}
for _, c in ipairs(chain) do out[#out + 1] = view(c.name) end
return done(out)
"""
)

# KEYS[1]: the tree's lease key. ARGV: base, ended_ttl, limit, pools (as a chain
# argument, in any order), starts. Views of the pools that exist (rolled, leases
# reclaimed).
VIEW_TREE = (
    PRELUDE
    + r"""
local ended_ttl, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local pools = parse_chain(ARGV[4])
parse_starts(ARGV[5])
for _, c in ipairs(pools) do
  local s = get(c.name)
  if s and s.period == c.period and s.tz == c.tz then roll(s, c.start) end
end
reclaim(now_ms(), ended_ttl, limit)
local out = {}
for _, c in ipairs(pools) do
  local v = view(c.name)
  if v then out[#out + 1] = v end
end
return done(out)
"""
)

# KEYS[1]: the tree's lease key. ARGV: base, ended_ttl, limit, starts. Returns how
# many ended; each expired reservation's pools roll before it is charged.
REAP = (
    PRELUDE
    + r"""
parse_starts(ARGV[4])
return done(reclaim(now_ms(), tonumber(ARGV[2]), tonumber(ARGV[3])))
"""
)

# KEYS[1]: the tree's lease key. ARGV: base, pools (chain argument, any order).
# Rolls every due pool, then returns each roll not yet announced, exactly once:
# {name, period, period_start, prev_period_start, prev_used, prev_used_usd, capacity}.
ROLL = (
    PRELUDE
    + r"""
local pools = parse_chain(ARGV[2])
for _, c in ipairs(pools) do
  local s = get(c.name)
  if s and s.period == c.period and s.tz == c.tz then roll(s, c.start) end
end
done(nil)
local out = {}
for _, c in ipairs(pools) do
  local s = get(c.name)
  if s and s.period ~= 'none' then
    local pk = pool_key(c.name)
    local a = redis.call('HMGET', pk, 'announced_start', 'prev_period_start', 'prev_used', 'prev_used_usd')
    if num(a[1]) < s.period_start then
      redis.call('HSET', pk, 'announced_start', int(s.period_start))
      out[#out + 1] = {c.name, s.period, int(s.period_start), a[2] or '0', a[3] or '0', a[4] or '0',
        int(s.capacity)}
    end
  end
end
return out
"""
)

# KEYS[1]: the pool's key. ARGV: base, name. An admin reset: used = 0 now; the
# current span starts now (Redis clock) and the reset is marked announced (its
# caller announces it). Returns {name, period, now, prev_start, prev_used,
# prev_used_usd, capacity} or {'not_found'}.
RESET = (
    PRELUDE
    + r"""
local name = ARGV[2]
local pk = pool_key(name)
local v = redis.call('HMGET', pk, 'capacity', 'period', 'period_start', 'used', 'used_usd')
if not v[1] then return {'not_found'} end
local now = now_ms()
redis.call('HSET', pk, 'prev_used', v[4] or '0', 'prev_used_usd', v[5] or '0', 'prev_period_start', v[3] or '0',
  'used', '0', 'used_usd', '0', 'period_start', int(now), 'announced_start', int(now))
return {'ok', name, v[2] or 'none', int(now), v[3] or '0', v[4] or '0', v[5] or '0', v[1]}
"""
)

# KEYS[1]: the pool's key. ARGV: base, name, mode, parent, capacity, period, tz,
# cap_usd, start. mode: create (fails when it exists), ensure (leaves an existing
# pool alone), upsert (sets the capacity of an existing pool), apply (sets every
# given field; the parent must match), update (sets the given fields; never
# creates). '' = keep for capacity/period/tz/cap_usd; '-' clears cap_usd. `start`
# is the period start of the period and time zone the pool will have.
# Returns {status, view}: status created | exists | updated | unchanged |
# not_found | no_parent | parent_differs.
DEFINE = (
    PRELUDE
    + r"""
local name, mode, parent = ARGV[2], ARGV[3], ARGV[4]
local capacity, period, tz, cap_usd, start = ARGV[5], ARGV[6], ARGV[7], ARGV[8], tonumber(ARGV[9])
local pk = pool_key(name)
local cur = redis.call('HMGET', pk, 'capacity', 'parent', 'period', 'tz', 'period_start')
if not cur[1] then
  if mode == 'update' then return {'not_found', false} end
  if parent ~= '' and redis.call('EXISTS', pool_key(parent)) == 0 then return {'no_parent', false} end
  -- A new incarnation: reservations of an earlier pool of this name never touch it.
  local inc = redis.call('INCR', base .. 'seq')
  redis.call('HSET', pk, 'capacity', capacity, 'parent', parent, 'period', period, 'tz', tz,
    'used', '0', 'reserved', '0', 'used_usd', '0', 'reserved_usd', '0', 'period_start', int(start),
    'prev_used', '0', 'prev_used_usd', '0', 'prev_period_start', '0', 'announced_start', int(start), 'children', '0',
    'inc', inc)
  if cap_usd ~= '' and cap_usd ~= '-' then redis.call('HSET', pk, 'cap_usd', cap_usd) end
  if parent ~= '' then redis.call('HINCRBY', pool_key(parent), 'children', 1) end
  return {'created', view(name)}
end
if mode == 'create' then return {'exists', view(name)} end
if mode == 'ensure' then return {'unchanged', view(name)} end
if mode == 'apply' and (cur[2] or '') ~= parent then return {'parent_differs', view(name)} end
if capacity ~= '' then redis.call('HSET', pk, 'capacity', capacity) end
if mode ~= 'upsert' then
  if cap_usd == '-' then
    redis.call('HDEL', pk, 'cap_usd')
  elseif cap_usd ~= '' then
    redis.call('HSET', pk, 'cap_usd', cap_usd)
  end
  local new_period, new_tz = cur[3] or 'none', cur[4] or 'UTC'
  if period ~= '' then new_period = period end
  if tz ~= '' then new_tz = tz end
  if new_period ~= (cur[3] or 'none') or new_tz ~= (cur[4] or 'UTC') then
    -- A new period definition counts from now on: usage so far stays (a change of
    -- settings grants no fresh budget), and there is no roll to announce.
    local ps = math.max(num(cur[5]), start)
    redis.call('HSET', pk, 'period', new_period, 'tz', new_tz, 'period_start', int(ps), 'announced_start', int(ps))
  end
end
return {'updated', view(name)}
"""
)

# KEYS[1]: the pool's key. ARGV: base, name. Returns {'ok'} | {'not_found'} | {'in_use', children}.
DELETE = (
    PRELUDE
    + r"""
local name = ARGV[2]
local pk = pool_key(name)
local v = redis.call('HMGET', pk, 'capacity', 'parent', 'children')
if not v[1] then return {'not_found'} end
if num(v[3]) > 0 then return {'in_use', int(num(v[3]))} end
redis.call('DEL', pk)
if v[2] and v[2] ~= '' then
  local parent = pool_key(v[2])
  local children = redis.call('HGET', parent, 'children')
  if children then redis.call('HSET', parent, 'children', int(math.max(0, num(children) - 1))) end
else
  -- The root goes last: the tree is empty. Its open reservations have no pool left.
  for _, id in ipairs(redis.call('ZRANGE', lease_key, 0, -1)) do redis.call('DEL', res_key(id)) end
  redis.call('DEL', lease_key, base .. 'seq')
end
return {'ok'}
"""
)
