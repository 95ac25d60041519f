-- Set a session's own retention (from its metadata), only while the session exists.
--
-- KEYS[1]  the session record
-- ARGV[1]  max length ('' = the relay's)   ARGV[2]  max age, ms ('' = the relay's)
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
for i, field in ipairs({'ret_len', 'ret_age_ms'}) do
  if ARGV[i] == '' then
    redis.call('HDEL', KEYS[1], field)
  else
    redis.call('HSET', KEYS[1], field, ARGV[i])
  end
end
return 1
