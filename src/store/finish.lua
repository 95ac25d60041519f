-- End one LLM turn: store its final entry, mark the turn done, acknowledge the request, retire
-- its live state and queue its usage callback, all at once, so a turn has exactly one final
-- entry and queues one callback whatever crashes or races happen.
--
-- KEYS[1]  the room stream (also its channel)     KEYS[2]  the turn key
-- KEYS[3]  the turn's live state   KEYS[4]  the room's turns in progress
-- KEYS[5]  the room's turn counter   KEYS[6]  the room's usage outbox   KEYS[7]  its records
-- KEYS[8]  the room's counters (see append.lua)   KEYS[9]  the room's attempts per turn
-- KEYS[10] the session record (per-room retention overrides `ret_len`, `ret_age_ms`)
-- ARGV[1]  MAXLEN ~ retention (0 = unbounded)
-- ARGV[2]  participant   ARGV[3]  event   ARGV[4]  body
-- ARGV[5]  consumer group   ARGV[6]  the request entry id (to XACK)   ARGV[7]  done-marker ttl, s
-- ARGV[8]  how long the live state lingers, ms   ARGV[9]  now, ms
-- ARGV[10] usage callback body, a JSON object without "turn" ('' = no callback)
-- ARGV[11] retention by age, ms (0 = none)   ARGV[12] room idle ttl, ms (0 = rooms never expire)
--
-- Returns {'stored', id, ordinal}; {'done', id} when some worker already finished this turn;
-- {'gone'} when the session was deleted (or deleted and created again): nothing is written, and
-- the caller queues the usage callback in the outbox of deleted sessions.

-- A deleted session (its stream is gone) gets nothing back.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'gone'}
end
local cur = redis.call('GET', KEYS[2])
if cur and string.sub(cur, 1, 5) == 'done:' then
  redis.call('XACK', KEYS[1], ARGV[5], ARGV[6])
  return {'done', string.sub(cur, 6)}
end
-- The request should still be pending in this stream's group. If it is not, either the session
-- was deleted while the turn ran and a new one exists under the same id (created through the
-- API, or by a first message): its stream never held this request, so the reply is not its to
-- keep; or the request was trimmed away (Redis 7 drops trimmed entries from the pending list
-- when they are claimed) or dead-lettered, and the session is the same. The turn's live state
-- tells them apart: the delete removed it, and nothing writes it again in a stream that does
-- not hold the request as pending (turn_attempt.lua, turn_progress.lua).
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[5], ARGV[6], ARGV[6], 1)
if (not ok or #pending == 0) and redis.call('EXISTS', KEYS[3]) == 0 then
  return {'gone'}
end
local maxlen = tonumber(redis.call('HGET', KEYS[10], 'ret_len') or ARGV[1])
local id
if maxlen > 0 then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*',
    'participant', ARGV[2], 'event', ARGV[3], 'body', ARGV[4])
else
  id = redis.call('XADD', KEYS[1], '*',
    'participant', ARGV[2], 'event', ARGV[3], 'body', ARGV[4])
end
local maxage = tonumber(redis.call('HGET', KEYS[10], 'ret_age_ms') or ARGV[11])
if maxage > 0 then
  local ms = tonumber(string.match(id, '^(%d+)'))
  redis.call('XTRIM', KEYS[1], 'MINID', '~', tostring(ms - maxage))
end
redis.call('HINCRBY', KEYS[8], 'p:' .. ARGV[2], 1)
redis.call('HINCRBY', KEYS[8], 'e:' .. ARGV[3], 1)
redis.call('SPUBLISH', KEYS[1], id .. '\n' .. ARGV[4])
redis.call('SET', KEYS[2], 'done:' .. id, 'EX', ARGV[7])
redis.call('XACK', KEYS[1], ARGV[5], ARGV[6])
redis.call('ZREM', KEYS[4], ARGV[6])
redis.call('HDEL', KEYS[9], ARGV[6])
redis.call('PEXPIRE', KEYS[3], ARGV[8])
local ordinal = redis.call('INCR', KEYS[5])
if ARGV[10] ~= '' then
  local body = string.sub(ARGV[10], 1, -2) .. ',"turn":' .. ordinal .. '}'
  redis.call('HSET', KEYS[7], ARGV[6], body, ARGV[6] .. '#created', ARGV[9], ARGV[6] .. '#attempts', 0)
  redis.call('ZADD', KEYS[6], ARGV[9], ARGV[6])
end
local idle = tonumber(ARGV[12])
if idle > 0 then
  -- The room's own keys live as long as the room has traffic (see append.lua).
  for _, k in ipairs({KEYS[1], KEYS[4], KEYS[5], KEYS[8], KEYS[9], KEYS[10]}) do
    redis.call('PEXPIRE', k, idle)
  end
end
return {'stored', id, ordinal}
