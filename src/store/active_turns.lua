-- The room's turns in progress with their live state, in start order; forgets turns whose
-- state expired (their worker died and nobody has taken them over yet).
--
-- KEYS[1]  the room's turns in progress   ARGV[1]  the state key prefix (up to the turn id)
--
-- Returns {turn id, {field, value, ...}, ...}.
local out = {}
for _, turn in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local state = redis.call('HGETALL', ARGV[1] .. turn)
  if #state == 0 then
    redis.call('ZREM', KEYS[1], turn)
  else
    table.insert(out, turn)
    table.insert(out, state)
  end
end
return out
