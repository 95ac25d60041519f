-- Append one envelope to a room and publish it, atomically.
--
-- KEYS[1]  the room stream; its name is also the room's pub/sub channel
-- ARGV[1]  MAXLEN ~ retention (0 = unbounded)
-- ARGV[2]  participant (role)      ARGV[3]  event      ARGV[4]  body (the envelope JSON)
-- ARGV[5]  consumer group to create with a new room ('' = none)
--
-- Why a script: the PUBLISH must leave Redis in stream order. Two relays appending to one room
-- concurrently could otherwise publish in the opposite order of their XADDs, and every node
-- delivers live entries in publish order.
-- Returns {id, created} where created is 1 when this call created the stream.
local created = redis.call('EXISTS', KEYS[1]) == 0
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
redis.call('PUBLISH', KEYS[1], id .. '\n' .. ARGV[4])
if created then
  return {id, 1}
end
return {id, 0}
