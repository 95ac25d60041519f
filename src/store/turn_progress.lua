-- Publish a turn's next deltas and record the text they add, at once: the state in Redis is
-- never behind what the room has been sent, so a member that joins and reads it misses nothing.
--
-- KEYS[1]  the room stream (also its channel)   KEYS[2]  the turn's live state (hash)
-- ARGV[1]  attempt   ARGV[2]  seq of the last delta included   ARGV[3]  the text so far
-- ARGV[4]  state ttl, ms   ARGV[5]  the LLM consumer group   ARGV[6]  the turn (its request's id)
-- ARGV[7..]  pub/sub payloads of the llm.delta frames, in order
--
-- Returns 1 when published. Else it publishes nothing and returns 0 when the state belongs to
-- another attempt (this worker lost the turn to another one) or is gone, or -1 when the
-- session was deleted (perhaps created again since: its stream does not hold the request).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local attempt = redis.call('HGET', KEYS[2], 'attempt')
if attempt ~= ARGV[1] then
  if not attempt then
    local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[5], ARGV[6], ARGV[6], 1)
    if not ok or #pending == 0 then
      return -1
    end
  end
  return 0
end
redis.call('HSET', KEYS[2], 'seq', ARGV[2], 'text', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
for i = 7, #ARGV do
  redis.call('SPUBLISH', KEYS[1], ARGV[i])
end
return 1
