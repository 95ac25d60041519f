-- Number the next attempt at an LLM turn, unless its session is gone: the counter lives as long
-- as the room, and one written after a delete would outlive it; and an attempt begun in a
-- session created again under the same id would show there.
--
-- KEYS[1]  the room stream   KEYS[2]  the room's attempts per turn (hash)
-- ARGV[1]  the turn (its request's id)   ARGV[2]  the LLM consumer group
--
-- Returns the attempt's number (from 1), or 0 when the stream is gone or does not hold the
-- request as pending.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[2], ARGV[1], ARGV[1], 1)
if not ok or #pending == 0 then
  return 0
end
return redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
