-- Who is connected to a room now, across nodes: each node keeps one entry per room it has
-- members in — how many connections each (role, subject) has there — refreshed by its
-- heartbeat, so a killed node's entry expires by itself. One entry per node and room, not one
-- per connection, keeps the heartbeat's cost to rooms × nodes.
--
-- KEYS[1]  the room's presence (hash: node -> its members, JSON)
-- KEYS[2]  when each node's entry expires (sorted set: node -> ms)
-- KEYS[3]  the presence's version (bumped on every change, so clients keep the newest)
-- ARGV[1]  now, ms   ARGV[2]  the keys' ttl, ms   ARGV[3]  'set', 'remove' or 'read'
-- ARGV[4]  the node   ARGV[5]  with 'set': its members (JSON)   ARGV[6]  with 'set': expiry, ms
--
-- Returns {version, members JSON of each live node, ...}.
local changed = false
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])) do
  redis.call('HDEL', KEYS[1], node)
  redis.call('ZREM', KEYS[2], node)
  changed = true
end
local op = ARGV[3]
if op == 'set' then
  if redis.call('HGET', KEYS[1], ARGV[4]) ~= ARGV[5] then
    redis.call('HSET', KEYS[1], ARGV[4], ARGV[5])
    changed = true
  end
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[4])
elseif op == 'remove' then
  if redis.call('HDEL', KEYS[1], ARGV[4]) > 0 then
    changed = true
  end
  redis.call('ZREM', KEYS[2], ARGV[4])
end
if op ~= 'read' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
local version = tonumber(redis.call('GET', KEYS[3]) or '0')
if changed then
  version = redis.call('INCR', KEYS[3])
end
redis.call('PEXPIRE', KEYS[3], ARGV[2])
local out = {version}
for _, m in ipairs(redis.call('HVALS', KEYS[1])) do
  table.insert(out, m)
end
return out
