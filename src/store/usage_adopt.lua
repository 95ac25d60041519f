-- Take usage callbacks into an outbox: those of a deleted session, into the outbox of deleted
-- sessions. Idempotent: taking the same callback twice keeps one, due at the earlier time.
--
-- KEYS[1]  the outbox (sorted set by due time)   KEYS[2]  its records (hash)
-- ARGV  five per callback: member, due time (ms), body, created (ms), attempts so far
for i = 1, #ARGV, 5 do
  local member = ARGV[i]
  redis.call('HSET', KEYS[2], member, ARGV[i + 2], member .. '#created', ARGV[i + 3],
    member .. '#attempts', ARGV[i + 4])
  -- LT adds a new member, and moves an existing one only to an earlier time.
  redis.call('ZADD', KEYS[1], 'LT', ARGV[i + 1], member)
end
return 1
