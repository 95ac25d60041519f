-- Append one envelope to a room and publish it, atomically; optionally idempotent.
--
-- KEYS[1]  the room stream; its name is also the room's pub/sub channel
-- KEYS[2]  the room's counters (a hash: p:<participant> and e:<event> -> entries stored)
-- KEYS[3]  (optional) the dedup key of (sender, cid), hash-tagged with the room key
-- KEYS[4]  (with KEYS[3]) the same pair's key as named before it was made injective: read, never
--          written, so a resend of a message stored just before the upgrade is still a duplicate.
--          Drop it once the dedup window has passed since every node writes KEYS[3] only.
-- ARGV[1]  MAXLEN ~ retention (0 = unbounded)
-- ARGV[2]  participant (role)      ARGV[3]  event      ARGV[4]  body (the envelope JSON)
-- ARGV[5]  consumer group to create with a new room ('' = none)
-- ARGV[6]  dedup window in seconds (with KEYS[3])
-- ARGV[7]  '1' to append only to a room that exists: nothing is stored when the stream does not
--          (the caller charges the client's room-creation budget, then appends again with '0')
--
-- Why a script: the PUBLISH must leave Redis in stream order. Two relays appending to one room
-- concurrently could otherwise publish in the opposite order of their XADDs, and every node
-- delivers live entries in publish order. The dedup check must be atomic with the XADD, or a
-- resend racing the original could store twice.
-- Returns {id, created, duplicate}: created = 1 when this call created the stream, duplicate = 1
-- when (sender, cid) was already stored and id is the original entry's; {'', 0, 0, 1} when
-- ARGV[7] is '1' and the room does not exist.
if KEYS[3] then
  local prev = redis.call('GET', KEYS[3])
  if not prev and KEYS[4] then
    prev = redis.call('GET', KEYS[4])
  end
  if prev then
    return {prev, 0, 1}
  end
end
local created = redis.call('EXISTS', KEYS[1]) == 0
if created and ARGV[7] == '1' then
  return {'', 0, 0, 1}
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
redis.call('HINCRBY', KEYS[2], 'p:' .. ARGV[2], 1)
redis.call('HINCRBY', KEYS[2], 'e:' .. ARGV[3], 1)
if KEYS[3] then
  redis.call('SET', KEYS[3], id, 'EX', ARGV[6])
end
redis.call('PUBLISH', KEYS[1], id .. '\n' .. ARGV[4])
if created then
  return {id, 1, 0}
end
return {id, 0, 0}
