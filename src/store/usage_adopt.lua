-- Take usage callbacks into an outbox: those of a deleted session, into the outbox of deleted
-- sessions. A callback already there is left as it is (its attempts, its deadline, its due
-- time, and a lease a worker may hold on it): the first copy wins.
--
-- KEYS[1]  the outbox (sorted set by due time)   KEYS[2]  its records (hash)
-- ARGV  five per callback: member, due time (ms), body, created (ms), attempts so far
for i = 1, #ARGV, 5 do
  local member = ARGV[i]
  if redis.call('HSETNX', KEYS[2], member, ARGV[i + 2]) == 1 then
    redis.call('HSET', KEYS[2], member .. '#created', ARGV[i + 3],
      member .. '#attempts', ARGV[i + 4])
    redis.call('ZADD', KEYS[1], 'NX', ARGV[i + 1], member)
  end
end
return 1
