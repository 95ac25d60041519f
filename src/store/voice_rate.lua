-- Count one voice request in a session's sliding window, if the session exists and the window
-- has room: a log of the last window's requests (a sorted set scored by Redis's own clock, so
-- every relay node counts against the same time).
--
-- KEYS[1]  the room stream   KEYS[2]  the session record   KEYS[3]  the session's request log
-- ARGV[1]  requests allowed per window   ARGV[2]  window, ms   ARGV[3]  a unique member suffix
--
-- Returns {'ok'}, {'missing'} (no such session: nothing counted) or {'limited', ms until the
-- oldest request in the window leaves it}.
if redis.call('EXISTS', KEYS[1], KEYS[2]) == 0 then
  return {'missing'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - window)
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  local wait = window
  if oldest[2] then
    wait = tonumber(oldest[2]) + window - now
  end
  return {'limited', math.max(wait, 1)}
end
redis.call('ZADD', KEYS[3], now, now .. ':' .. ARGV[3])
redis.call('PEXPIRE', KEYS[3], window)
return {'ok'}
