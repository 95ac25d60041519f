-- Who is connected to a room now, across nodes: a sorted set of connections scored by when
-- each stops counting unless its node refreshes it (node heartbeats), so a killed node's
-- connections vanish by themselves.
--
-- KEYS[1]  the room's presence (sorted set: member JSON -> expiry ms)
-- KEYS[2]  its version counter (bumped on every change, so clients keep the newest snapshot)
-- ARGV[1]  now, ms   ARGV[2]  key ttl, ms (the set outlives its last refresh by this much)
-- ARGV[3]  'enter', 'leave', 'refresh' or 'read'
-- ARGV[4..] with enter/refresh: expiry, member, expiry, member, ...; with leave: members
--
-- Returns {version, member, member, ...}: the set after the change, expired members pruned.
local changed = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1]) > 0
local op = ARGV[3]
if op == 'enter' or op == 'refresh' then
  for i = 4, #ARGV, 2 do
    local added = redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
    if added > 0 then
      changed = true
    end
  end
elseif op == 'leave' then
  for i = 4, #ARGV do
    if redis.call('ZREM', KEYS[1], ARGV[i]) > 0 then
      changed = true
    end
  end
end
if op ~= 'read' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local version = tonumber(redis.call('GET', KEYS[2]) or '0')
if changed then
  version = redis.call('INCR', KEYS[2])
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local out = {version}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  table.insert(out, m)
end
return out
