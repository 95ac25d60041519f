-- Replace a session's metadata if nobody changed it since it was read (compare and set on the
-- record's version), so concurrent merge patches never lose each other's fields.
--
-- KEYS[1]  the room stream   KEYS[2]  the session record
-- ARGV[1]  the version read ('0': no record yet, a room that exists only through its entries)
-- ARGV[2]  the new metadata (a JSON object)   ARGV[3]  now, ms
-- ARGV[4]  created, ms, for a record written here for the first time
--
-- Returns 'ok', 'conflict' (read again and retry) or 'missing' (no such session).
if redis.call('EXISTS', KEYS[1], KEYS[2]) == 0 then
  return 'missing'
end
local version = redis.call('HGET', KEYS[2], 'version') or '0'
if version ~= ARGV[1] then
  return 'conflict'
end
if version == '0' then
  redis.call('HSET', KEYS[2], 'created', ARGV[4])
end
redis.call('HSET', KEYS[2], 'metadata', ARGV[2], 'updated', ARGV[3],
  'version', tonumber(version) + 1)
return 'ok'
