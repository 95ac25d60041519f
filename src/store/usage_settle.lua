-- Settle one usage callback: delivered or given up ('drop'), or to be tried again at a time.
--
-- KEYS[1]  the room's usage outbox   KEYS[2]  their records
-- ARGV[1]  turn id   ARGV[2]  'drop' or 'retry'   ARGV[3]  next due time, ms (with 'retry')
if ARGV[2] == 'retry' then
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1], ARGV[1] .. '#created', ARGV[1] .. '#attempts')
end
return 1
