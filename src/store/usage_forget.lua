-- Unlist a room from the usage index unless a callback was queued there recently.
--
-- KEYS[1]  the index of rooms with usage callbacks   ARGV[1]  room id   ARGV[2]  listed before, ms
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) < tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return 1
