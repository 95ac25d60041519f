-- Take the room's usage callbacks that are due, leasing each (pushing its due time past the
-- lease) so that no other worker sends it meanwhile; a worker that dies lets the lease run out.
--
-- KEYS[1]  the room's usage outbox (sorted set by due time)   KEYS[2]  their records (hash)
-- ARGV[1]  now, ms   ARGV[2]  lease, ms   ARGV[3]  most callbacks to take
--
-- Returns {pending, {turn, body, created ms, attempts so far}, ...}.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {redis.call('ZCARD', KEYS[1])}
for _, turn in ipairs(due) do
  local body = redis.call('HGET', KEYS[2], turn)
  if body then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), turn)
    local attempts = redis.call('HINCRBY', KEYS[2], turn .. '#attempts', 1)
    table.insert(out, {turn, body, redis.call('HGET', KEYS[2], turn .. '#created') or ARGV[1], attempts})
  else
    redis.call('ZREM', KEYS[1], turn)
  end
end
return out
