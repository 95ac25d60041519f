-- Append one envelope to a room and publish it, atomically; optionally idempotent; optionally
-- only to a room that exists, or only to a new one (creating the session record with it). Trims
-- by length and age, keeps the room's keys alive for the idle ttl, and says when the room woke.
--
-- KEYS[1]  the room stream; its name is also the room's (sharded) pub/sub channel
-- KEYS[2]  the room's counters (a hash: p:<participant> and e:<event> -> entries stored)
-- KEYS[3]  the session record (a hash; per-room retention overrides `ret_len`, `ret_age_ms`)
-- KEYS[4]  the room's awake marker (set for the wake window by every append)
-- KEYS[5]  the room's turn counter   KEYS[6]  its attempts per turn   KEYS[7]  its turns in
--          progress (only kept alive here, with the idle ttl)
-- KEYS[8]  (optional) the dedup key of (sender, cid)
-- KEYS[9]  (with KEYS[8]) the same pair's key as named before it was made injective: read, never
--          written, so a resend of a message stored just before the upgrade is still a duplicate.
--          Drop it once the dedup window has passed since every node writes KEYS[8] only.
-- ARGV[1]  MAXLEN ~ retention (0 = unbounded)
-- ARGV[2]  participant (role)      ARGV[3]  event      ARGV[4]  body (the envelope JSON)
-- ARGV[5]  consumer group to create with a new room ('' = none)
-- ARGV[6]  dedup window in seconds (with KEYS[8])
-- ARGV[7]  which room: 'any' (create it if needed), 'existing' (the stream or the record must
--          exist), 'new' (neither may exist; the record is written with the entry)
-- ARGV[8]  with 'new': the session's metadata (a JSON object)
-- ARGV[9]  retention by age, ms (0 = none)   ARGV[10]  room idle ttl, ms (0 = never expire)
-- ARGV[11] wake window, ms: a room with no entry for that long is announced again
--
-- Why a script: the SPUBLISH must leave Redis in stream order. Two relays appending to one room
-- concurrently could otherwise publish in the opposite order of their XADDs, and every node
-- delivers live entries in publish order. The dedup check must be atomic with the XADD, or a
-- resend racing the original could store twice; the existence check too, or an append racing a
-- DELETE could bring a deleted session back.
-- Returns {id, created, duplicate, woke}: created = 1 when this call created the stream,
-- duplicate = 1 when (sender, cid) was already stored and id is the original entry's, woke = 1
-- when the room had no entry for the wake window. Returns the string 'missing' ('existing': no
-- such room) or 'exists' ('new': the room is already there).
if KEYS[8] then
  local prev = redis.call('GET', KEYS[8])
  if not prev and KEYS[9] then
    prev = redis.call('GET', KEYS[9])
  end
  if prev then
    return {prev, 0, 1, 0}
  end
end
local created = redis.call('EXISTS', KEYS[1]) == 0
if ARGV[7] == 'existing' and created and redis.call('EXISTS', KEYS[3]) == 0 then
  return 'missing'
end
if ARGV[7] == 'new' and (not created or redis.call('EXISTS', KEYS[3]) == 1) then
  return 'exists'
end
local maxlen = tonumber(redis.call('HGET', KEYS[3], 'ret_len') or ARGV[1])
local id
if maxlen > 0 then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*',
    'participant', ARGV[2], 'event', ARGV[3], 'body', ARGV[4])
else
  id = redis.call('XADD', KEYS[1], '*',
    'participant', ARGV[2], 'event', ARGV[3], 'body', ARGV[4])
end
local ms = tonumber(string.match(id, '^(%d+)'))
local maxage = tonumber(redis.call('HGET', KEYS[3], 'ret_age_ms') or ARGV[9])
if maxage > 0 then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', tostring(ms - maxage))
end
if created and ARGV[5] ~= '' then
  -- At 0, not $: the entry just written is the group's first to read.
  redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[5], '0')
end
if ARGV[7] == 'new' then
  -- Created when its first entry was: the time part of the entry's id.
  redis.call('HSET', KEYS[3], 'created', ms, 'updated', ms, 'metadata', ARGV[8], 'version', 1)
end
redis.call('HINCRBY', KEYS[2], 'p:' .. ARGV[2], 1)
redis.call('HINCRBY', KEYS[2], 'e:' .. ARGV[3], 1)
if KEYS[8] then
  redis.call('SET', KEYS[8], id, 'EX', ARGV[6])
end
-- SET ... GET answers the previous value: none means the room was silent for the window.
local woke = not redis.call('SET', KEYS[4], '1', 'PX', ARGV[11], 'GET')
local idle = tonumber(ARGV[10])
if idle > 0 then
  -- Everything the room owns under a fixed name lives as long as the room has traffic; keys
  -- with their own names (dedup, turn leases, flags) get ttls no longer than this.
  for i = 1, 7 do
    if i ~= 4 then
      redis.call('PEXPIRE', KEYS[i], idle)
    end
  end
end
redis.call('SPUBLISH', KEYS[1], id .. '\n' .. ARGV[4])
return {id, created and 1 or 0, 0, (woke and not created) and 1 or 0}
