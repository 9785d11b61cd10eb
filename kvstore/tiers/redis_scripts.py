"""The Lua scripts of `RedisTier`: each runs atomically and touches keys of one Redis Cluster slot.

Shared conventions:
- A block key is a HASH: `d` the block container, `c` its 32-byte content hash, `r` the number of session
  manifests referencing it, `t` the unix time it was last referenced. Its bytes (for the stats) are
  len(d) + len(c).
- A session key is a HASH: `m` its manifest (and, from format 1, possibly a legacy `kv` field).
- A stats key is a HASH: `bytes` (session field bytes + block bytes of its scope), `sessions`, `blocks`.
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

# KEYS: session, stats, nadd add-block keys, ndrop drop-block keys (all in the tenant's slot).
# ARGV: expected manifest sha1 ('' none, '*' any), manifest, nadd, ndrop, now, ttl, then (content, data) per add.
# Returns {'ok', session hash bytes} | {'stale'} | {'conflict:i' | 'missing:i', ...}.
COMMIT = _LIB + """
local key, stats = KEYS[1], KEYS[2]
if ARGV[1] ~= '*' and manifest_sha(key) ~= ARGV[1] then return {'stale'} end
local nadd, ndrop, now, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local bad = check_adds(3, 7, nadd)
if #bad > 0 then return bad end
local existed = redis.call('EXISTS', key)
local bytes, created = apply_adds(3, 7, nadd, now, ttl)
bytes = bytes + string.len(ARGV[2]) - redis.call('HSTRLEN', key, 'm') - redis.call('HSTRLEN', key, 'kv')
redis.call('HSET', key, 'm', ARGV[2])
redis.call('HDEL', key, 'kv')
local dropped, deleted = apply_drops(3 + nadd, ndrop)
bump(stats, bytes + dropped, 1 - existed, created - deleted)
return {'ok', redis.call('HSTRLEN', key, 'm')}
"""

# KEYS: stats, n block keys (one slot). ARGV: 'add' | 'drop', now, ttl, then (content, data) per add.
# Returns {'ok'} | the refused adds as in COMMIT.
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

# KEYS: session, stats, drop-block keys (tenant slot). ARGV: expected manifest sha1 ('*' any).
# Returns 1 if the session existed, 0 if not, -1 if its manifest changed meanwhile (nothing written).
DELETE = _LIB + """
local key, stats = KEYS[1], KEYS[2]
if redis.call('EXISTS', key) == 0 then return 0 end
if ARGV[1] ~= '*' and manifest_sha(key) ~= ARGV[1] then return -1 end
local total = 0
for _, f in ipairs(redis.call('HKEYS', key)) do total = total + redis.call('HSTRLEN', key, f) end
redis.call('DEL', key)
local dropped, deleted = apply_drops(3, #KEYS - 2)
bump(stats, dropped - total, -1, -deleted)
return 1
"""

# KEYS: stats, block key. ARGV: the true reference count, grace seconds, now.
# Sets `r` to the true count; deletes an unreferenced block last referenced more than `grace` ago.
# Returns 1 if deleted, 0 if fixed or kept.
COLLECT = """
local k = KEYS[2]
if redis.call('EXISTS', k) == 0 then return 0 end
local want, grace, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if want > 0 then redis.call('HSET', k, 'r', want) return 0 end
local t = tonumber(redis.call('HGET', k, 't') or '0')
if now - t < grace then return 0 end
local bytes = redis.call('HSTRLEN', k, 'd') + redis.call('HSTRLEN', k, 'c')
redis.call('DEL', k)
redis.call('HINCRBY', KEYS[1], 'bytes', -bytes)
redis.call('HINCRBY', KEYS[1], 'blocks', -1)
return 1
"""

# KEYS: public stats, public registry, n block keys (all in the public slot).
# ARGV: prefix id, its block digests (concatenated), now, ttl, then (content, data) per block.
# The registry entry holds one reference to each block, so public prefixes outlive the sessions using them.
# Returns {'ok'} | {'exists'} | the refused adds as in COMMIT.
PUBLISH = _LIB + """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {'exists'} end
local n = #KEYS - 2
local bad = check_adds(3, 5, n)
if #bad > 0 then return bad end
local bytes, created = apply_adds(3, 5, n, ARGV[3], tonumber(ARGV[4]))
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
bump(KEYS[1], bytes + string.len(ARGV[1]) + string.len(ARGV[2]), 0, created)
return {'ok'}
"""

# KEYS: public stats, public registry, the prefix's block keys. ARGV: prefix id. Returns 1 if it was registered.
UNPUBLISH = _LIB + """
local entry = redis.call('HGET', KEYS[2], ARGV[1])
if not entry then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
local bytes, deleted = apply_drops(3, #KEYS - 2)
bump(KEYS[1], bytes - string.len(ARGV[1]) - string.len(entry), 0, -deleted)
return 1
"""
