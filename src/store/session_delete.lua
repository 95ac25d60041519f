-- Delete a session: every key of the room with a fixed name, then tell every node, at once.
-- Keys with variable names (per-turn keys, rate windows) are found by SCAN
-- afterwards; with the stream and the record gone, no script writes to the room again
-- (append.lua with 'existing' refuses, finish.lua stores nothing).
--
-- KEYS[1]  the room stream (also its channel)   KEYS[2]  the session record
-- KEYS[3..]  the room's other fixed keys (counters, turns in progress, attempts per turn, turn
--            counter, usage outbox and records, cid generations)
-- ARGV[1]  the room-deleted notice, published on the room's channel
--
-- Returns 1, or 0 when there was no such session (neither stream nor record).
if redis.call('EXISTS', KEYS[1], KEYS[2]) == 0 then
  return 0
end
redis.call('DEL', unpack(KEYS))
redis.call('SPUBLISH', KEYS[1], ARGV[1])
return 1
