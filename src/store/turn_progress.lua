-- Publish a turn's next deltas and record the text they add, at once: the state in Redis is
-- never behind what the room has been sent, so a member that joins and reads it misses nothing.
--
-- KEYS[1]  the room stream (also its channel)   KEYS[2]  the turn's live state (hash)
-- ARGV[1]  attempt   ARGV[2]  seq of the last delta included   ARGV[3]  the text so far
-- ARGV[4]  state ttl, ms   ARGV[5..]  pub/sub payloads of the llm.delta frames, in order
--
-- Returns 1 when published; else, publishing nothing, 0 when the state belongs to another
-- attempt (this worker lost the turn to another one) or is gone, and -1 when the session was
-- deleted.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
if redis.call('HGET', KEYS[2], 'attempt') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[2], 'seq', ARGV[2], 'text', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
for i = 5, #ARGV do
  redis.call('SPUBLISH', KEYS[1], ARGV[i])
end
return 1
