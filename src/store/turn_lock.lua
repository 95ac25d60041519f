-- Take or renew the lease on one LLM turn.
--
-- KEYS[1]  the turn key (hash-tagged with the room key, so it lives on the room's shard)
-- KEYS[2]  the turn's live state, kept alive as long as the lease   KEYS[3]  the room stream
-- ARGV[1]  the worker's token   ARGV[2]  lease in ms   ARGV[3]  live state ttl in ms
-- ARGV[4]  the LLM consumer group   ARGV[5]  the turn (its request's id)
--
-- Returns {'acquired'}, {'busy'} (another live worker holds it), {'done', <reply id>} or
-- {'gone'}: the session was deleted (perhaps created again since: then its stream does not
-- hold the request), and a lease taken now would outlive it by its ttl.
if redis.call('EXISTS', KEYS[3]) == 0 then
  return {'gone'}
end
local cur = redis.call('GET', KEYS[1])
if not cur then
  local ok, pending = pcall(redis.call, 'XPENDING', KEYS[3], ARGV[4], ARGV[5], ARGV[5], 1)
  if not ok or #pending == 0 then
    return {'gone'}
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {'acquired'}
end
if string.sub(cur, 1, 5) == 'done:' then
  return {'done', string.sub(cur, 6)}
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  -- The state outlives the lease, so a turn taken over still shows its last text.
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return {'acquired'}
end
return {'busy'}
