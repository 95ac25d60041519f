-- Append one envelope to a room and publish it, atomically; optionally idempotent; optionally
-- only to a room that exists, or only to a new one (creating the session record with it).
--
-- KEYS[1]  the room stream; its name is also the room's pub/sub channel
-- KEYS[2]  the room's counters (a hash: p:<participant> and e:<event> -> entries stored)
-- KEYS[3]  the session record (a hash), hash-tagged with the room key
-- KEYS[4]  (optional) the dedup key of (sender, cid), hash-tagged with the room key
-- ARGV[1]  MAXLEN ~ retention (0 = unbounded)
-- ARGV[2]  participant (role)      ARGV[3]  event      ARGV[4]  body (the envelope JSON)
-- ARGV[5]  consumer group to create with a new room ('' = none)
-- ARGV[6]  dedup window in seconds (with KEYS[4])
-- ARGV[7]  which room: 'any' (create it if needed), 'existing' (the stream or the record must
--          exist), 'new' (neither may exist; the record is written with the entry)
-- ARGV[8]  with 'new': the session's metadata (a JSON object)
--
-- Why a script: the SPUBLISH must leave Redis in stream order. Two relays appending to one room
-- concurrently could otherwise publish in the opposite order of their XADDs, and every node
-- delivers live entries in publish order. The dedup check must be atomic with the XADD, or a
-- resend racing the original could store twice; the existence check too, or an append racing a
-- DELETE could bring a deleted session back.
-- Returns {id, created, duplicate}: created = 1 when this call created the stream, duplicate = 1
-- when (sender, cid) was already stored and id is the original entry's. Returns the string
-- 'missing' ('existing': no such room) or 'exists' ('new': the room is already there).
if KEYS[4] then
  local prev = redis.call('GET', KEYS[4])
  if prev then
    return {prev, 0, 1}
  end
end
local created = redis.call('EXISTS', KEYS[1]) == 0
if ARGV[7] == 'existing' and created and redis.call('EXISTS', KEYS[3]) == 0 then
  return 'missing'
end
if ARGV[7] == 'new' and (not created or redis.call('EXISTS', KEYS[3]) == 1) then
  return 'exists'
end
local id
if tonumber(ARGV[1]) > 0 then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
    'participant', ARGV[2], 'event', ARGV[3], 'body', ARGV[4])
else
  id = redis.call('XADD', KEYS[1], '*',
    'participant', ARGV[2], 'event', ARGV[3], 'body', ARGV[4])
end
if created and ARGV[5] ~= '' then
  -- At 0, not $: the entry just written is the group's first to read.
  redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[5], '0')
end
if ARGV[7] == 'new' then
  -- Created when its first entry was: the time part of the entry's id.
  local ms = string.match(id, '^(%d+)')
  redis.call('HSET', KEYS[3], 'created', ms, 'updated', ms, 'metadata', ARGV[8], 'version', 1)
end
redis.call('HINCRBY', KEYS[2], 'p:' .. ARGV[2], 1)
redis.call('HINCRBY', KEYS[2], 'e:' .. ARGV[3], 1)
if KEYS[4] then
  redis.call('SET', KEYS[4], id, 'EX', ARGV[6])
end
redis.call('SPUBLISH', KEYS[1], id .. '\n' .. ARGV[4])
if created then
  return {id, 1, 0}
end
return {id, 0, 0}
