-- Delete a session: every key of the room with a fixed name, then tell every node, at once.
-- Keys with variable names (per-turn keys, rate windows) are found by SCAN
-- afterwards; with the stream and the record gone, no script writes to the room again
-- (append.lua with 'existing' refuses, finish.lua stores nothing).
--
-- The usage callbacks still to deliver are billing, not history: they are read and deleted in
-- the same step and handed back, for the caller to move to the outbox of deleted sessions.
--
-- KEYS[1]  the room stream (also its channel)   KEYS[2]  the session record
-- KEYS[3]  the room's usage outbox (sorted set by due time)   KEYS[4]  their records (hash)
-- KEYS[5..]  the room's other fixed keys (counters, turns in progress, attempts per turn, turn
--            counter, cid generations)
-- ARGV[1]  the room-deleted notice, published on the room's channel
--
-- Returns 0 when there was no such session (neither stream nor record), else 1 followed by
-- five strings per callback that was pending: turn id, due time (ms), body, created (ms),
-- attempts so far.
if redis.call('EXISTS', KEYS[1], KEYS[2]) == 0 then
  return 0
end
local out = {1}
local due = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
for i = 1, #due, 2 do
  local turn = due[i]
  local body = redis.call('HGET', KEYS[4], turn)
  if body then
    out[#out + 1] = turn
    out[#out + 1] = due[i + 1]
    out[#out + 1] = body
    out[#out + 1] = redis.call('HGET', KEYS[4], turn .. '#created') or '0'
    out[#out + 1] = redis.call('HGET', KEYS[4], turn .. '#attempts') or '0'
  end
end
redis.call('DEL', unpack(KEYS))
redis.call('SPUBLISH', KEYS[1], ARGV[1])
return out
