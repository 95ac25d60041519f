-- Begin one attempt at an LLM turn: record its state and announce it with llm.start, at once,
-- so a member that reads the state and one that got the llm.start agree on where the text is.
--
-- KEYS[1]  the room stream (also its channel)   KEYS[2]  the turn's live state (hash)
-- KEYS[3]  the room's turns in progress (sorted set)
-- ARGV[1]  attempt   ARGV[2]  requester role   ARGV[3]  requester subject ('' = none)
-- ARGV[4]  started, ms   ARGV[5]  model   ARGV[6]  prompt tokens (estimated) of this attempt
-- ARGV[7]  completion tokens of earlier attempts   ARGV[8]  prompt tokens of earlier attempts
-- ARGV[9]  state ttl, ms   ARGV[10]  turn id   ARGV[11]  pub/sub payload of the llm.start frame

-- A deleted session (its stream is gone): record nothing; the attempt's first flush then finds
-- no state and stops.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'attempt', ARGV[1], 'seq', -1, 'text', '',
  'requester', ARGV[2], 'sub', ARGV[3], 'started', ARGV[4], 'model', ARGV[5],
  'prompt', ARGV[6], 'carried_completion', ARGV[7], 'carried_prompt', ARGV[8])
redis.call('PEXPIRE', KEYS[2], ARGV[9])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[10])
redis.call('SPUBLISH', KEYS[1], ARGV[11])
return 1
