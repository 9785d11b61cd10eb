"""The Lua scripts of `RedisTier`: each runs atomically and touches keys of one Redis Cluster slot (one
bucket of kvstore/tiers/key_layout.py: a session, the blocks of the bucket, the bucket's counters).

Shared conventions:
- A block key is a HASH: `d` the block container, `c` its 32-byte content hash, `r` the number of session
  manifests (and public-registry entries) referencing it, `t` the unix time it was last referenced. Its
  bytes (for the counters) are len(d) + len(c).
- A session key is a HASH: `m` its manifest.
- A counter key is a HASH: `bytes` (session field bytes + block bytes + registry bytes of its bucket),
  `sessions`, `blocks`; every script that changes what a bucket stores updates the bucket's counters in the
  same script, so they always equal what the bucket stores.
- "adds" take a reference to a block: an existing block must hold the given content hash (else the add
  is a "conflict"); an absent one is created from the given data (an add without data for an absent
  block is "missing"). Every add is validated before anything is written, so a refused call writes nothing.
- "drops" release a reference; a block whose count reaches 0 is deleted.
"""

# Shared Lua helpers, prepended to the scripts. `ttl` > 0 sets an expiry on blocks (volatile-lru eviction).
_LIB = """
local function check_adds(first_key, first_arg, n)
  local bad = {}
  for i = 0, n - 1 do
    local k, c, d = KEYS[first_key + i], ARGV[first_arg + 2 * i], ARGV[first_arg + 2 * i + 1]
    local have = redis.call('HGET', k, 'c')
    if have then
      if have ~= c then table.insert(bad, 'conflict:' .. i) end
    elseif d == '' then
      table.insert(bad, 'missing:' .. i)
    end
  end
  return bad
end

local function apply_adds(first_key, first_arg, n, now, ttl)
  local delta, created = 0, 0
  for i = 0, n - 1 do
    local k, c, d = KEYS[first_key + i], ARGV[first_arg + 2 * i], ARGV[first_arg + 2 * i + 1]
    if redis.call('EXISTS', k) == 1 then
      redis.call('HINCRBY', k, 'r', 1)
    else
      redis.call('HSET', k, 'd', d, 'c', c, 'r', 1)
      delta = delta + string.len(d) + string.len(c)
      created = created + 1
    end
    redis.call('HSET', k, 't', now)
    if ttl > 0 then redis.call('EXPIRE', k, ttl) end
  end
  return delta, created
end

local function apply_drops(first_key, n)
  local delta, deleted = 0, 0
  for i = 0, n - 1 do
    local k = KEYS[first_key + i]
    if redis.call('EXISTS', k) == 1 then
      if redis.call('HINCRBY', k, 'r', -1) <= 0 then
        delta = delta - redis.call('HSTRLEN', k, 'd') - redis.call('HSTRLEN', k, 'c')
        redis.call('DEL', k)
        deleted = deleted + 1
      end
    end
  end
  return delta, deleted
end

local function bump(stats, bytes, sessions, blocks)
  if bytes ~= 0 then redis.call('HINCRBY', stats, 'bytes', bytes) end
  if sessions ~= 0 then redis.call('HINCRBY', stats, 'sessions', sessions) end
  if blocks ~= 0 then redis.call('HINCRBY', stats, 'blocks', blocks) end
end

local function manifest_sha(key)
  local cur = redis.call('HGET', key, 'm')
  if cur then return redis.sha1hex(cur) end
  return ''
end
"""

# KEYS: session, its bucket's counters. ARGV: expected manifest sha1 ('' none, '*' any), manifest.
# The blocks the manifest lists were referenced before (REFS add); this only writes the manifest.
# Returns {'ok', session hash bytes} | {'stale'}.
COMMIT = _LIB + """
local key, stats = KEYS[1], KEYS[2]
if ARGV[1] ~= '*' and manifest_sha(key) ~= ARGV[1] then return {'stale'} end
local existed = redis.call('EXISTS', key)
local bytes = string.len(ARGV[2]) - redis.call('HSTRLEN', key, 'm')
redis.call('HSET', key, 'm', ARGV[2])
bump(stats, bytes, 1 - existed, 0)
return {'ok', redis.call('HSTRLEN', key, 'm')}
"""

# KEYS: the bucket's counters, n block keys of the bucket. ARGV: 'add' | 'drop', now, ttl, then
# (content, data) per add. Returns {'ok'} | {'conflict:i' | 'missing:i', ...} (an add refused: nothing written).
REFS = _LIB + """
local n, now, ttl = #KEYS - 1, ARGV[2], tonumber(ARGV[3])
if ARGV[1] == 'add' then
  local bad = check_adds(2, 4, n)
  if #bad > 0 then return bad end
  local bytes, created = apply_adds(2, 4, n, now, ttl)
  bump(KEYS[1], bytes, 0, created)
else
  local bytes, deleted = apply_drops(2, n)
  bump(KEYS[1], bytes, 0, -deleted)
end
return {'ok'}
"""

# KEYS: session, its bucket's counters. ARGV: expected manifest sha1 ('*' any).
# Returns 1 if the session existed (now deleted), 0 if not, -1 if its manifest changed meanwhile (nothing
# written). The caller drops the blocks' references afterwards (REFS drop).
DELETE = _LIB + """
local key, stats = KEYS[1], KEYS[2]
if redis.call('EXISTS', key) == 0 then return 0 end
if ARGV[1] ~= '*' and manifest_sha(key) ~= ARGV[1] then return -1 end
local total = 0
for _, f in ipairs(redis.call('HKEYS', key)) do total = total + redis.call('HSTRLEN', key, f) end
redis.call('DEL', key)
bump(stats, -total, -1, 0)
return 1
"""

# KEYS: the bucket's counters, block key. ARGV: the true reference count, cutoff (unix seconds).
# A block referenced after `cutoff` is left alone (a commit may be taking it); otherwise `r` is set to the
# true count, or the block is deleted when that is 0. Returns 0 kept, 1 count fixed, 2 deleted.
COLLECT = """
local k = KEYS[2]
if redis.call('EXISTS', k) == 0 then return 0 end
local want, cutoff = tonumber(ARGV[1]), tonumber(ARGV[2])
if tonumber(redis.call('HGET', k, 't') or '0') > cutoff then return 0 end
if want > 0 then
  if tonumber(redis.call('HGET', k, 'r') or '0') == want then return 0 end
  redis.call('HSET', k, 'r', want)
  return 1
end
local bytes = redis.call('HSTRLEN', k, 'd') + redis.call('HSTRLEN', k, 'c')
redis.call('DEL', k)
redis.call('HINCRBY', KEYS[1], 'bytes', -bytes)
redis.call('HINCRBY', KEYS[1], 'blocks', -1)
return 2
"""

# KEYS: public registry, its counters. ARGV: prefix id, its block digests (concatenated).
# The blocks were referenced before (REFS add, one reference each for the entry). Returns 1 if registered,
# 0 if the prefix was registered already (the caller then releases its references).
PUBLISH = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], 'bytes', string.len(ARGV[1]) + string.len(ARGV[2]))
return 1
"""

# KEYS: public registry, its counters. ARGV: prefix id. Returns the entry's digests if it was registered
# (the caller then releases its blocks' references), else false.
UNPUBLISH = """
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], 'bytes', -(string.len(ARGV[1]) + string.len(entry)))
return entry
"""
