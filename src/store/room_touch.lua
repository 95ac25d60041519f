-- Keep an idle room alive while it has live members: its own keys get the idle ttl again, as
-- an append would give them (see append.lua).
--
-- KEYS     the room stream, its counters, its session record, its turn counter, its attempts
--          per turn, its turns in progress
-- ARGV[1]  room idle ttl, ms
for _, k in ipairs(KEYS) do
  redis.call('PEXPIRE', k, ARGV[1])
end
return 1
