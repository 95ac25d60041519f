-- Group commit: append a batch of envelopes to one room, in order, and publish them once,
-- atomically. Each entry is optionally idempotent, and goes only to a room that exists, or only
-- to a new one (creating the session record with it), or to any. Trims by length and age, keeps
-- the room's keys alive for the idle ttl, and says when the room woke.
--
-- KEYS[1]  the room stream; its name is also the room's (sharded) pub/sub channel
-- KEYS[2]  the room's counters (a hash: p:<participant> and e:<event> -> entries stored)
-- KEYS[3]  the session record (a hash; per-room retention overrides `ret_len`, `ret_age_ms`)
-- KEYS[4]  the room's awake marker (set for the wake window by every batch that stores)
-- KEYS[5]  the room's turn counter   KEYS[6]  its attempts per turn   KEYS[7]  its turns in
--          progress (only kept alive here, with the idle ttl)
-- KEYS[8…] the dedup keys of the entries that have some, in entry order: per such entry the
--          injective key of (sender, cid), then optionally the same pair's key as named before it
--          was made injective: read, never written, so a resend of a message stored just before
--          the upgrade is still a duplicate. Drop it once the dedup window has passed since every
--          node writes the injective key only.
-- ARGV[1]  MAXLEN ~ retention (0 = unbounded)
-- ARGV[2]  consumer group to create with a new room ('' = none)
-- ARGV[3]  dedup window in seconds
-- ARGV[4]  retention by age, ms (0 = none)   ARGV[5]  room idle ttl, ms (0 = never expire)
-- ARGV[6]  wake window, ms: a room with no entry for that long is announced again
-- then 6 per entry:
--   which room: 'any' (create it if needed), 'existing' (the stream or the record must exist),
--   'new' (neither may exist; the record is written with the entry); participant (role); event;
--   body (the envelope JSON); how many dedup keys it has (0, 1 or 2); with 'new', the
--   session's metadata (a JSON object)
--
-- Why a script: the SPUBLISH must leave Redis in stream order. Two relays appending to one room
-- concurrently could otherwise publish in the opposite order of their XADDs, and every node
-- delivers live entries in publish order. The dedup check must be atomic with the XADD, or a
-- resend racing the original could store twice; the existence check too, or an append racing a
-- DELETE could bring a deleted session back. Why a batch: the per-call work (the checks, the
-- counters, the expiries, the publish) is paid once for every entry that was ready.
--
-- Publishes `<id>\n<body>` for a single entry, else `-b\n` then `<id> <byte length>\n<body>` per
-- entry (see feed.rs). Returns {woke, r1, r2, …}: woke = 1 when the room had no entry for the
-- wake window (and this batch did not create it); per entry {id, created, duplicate}, where
-- created = 1 when it created the stream and duplicate = 1 when (sender, cid) was already stored
-- (id is then the original entry's), or the string 'missing' ('existing': no such room) or
-- 'exists' ('new': the room is already there).
local stream_exists = redis.call('EXISTS', KEYS[1]) == 1
local record
local function has_record()
  if record == nil then
    record = redis.call('EXISTS', KEYS[3]) == 1
  end
  return record
end
local maxlen = tonumber(redis.call('HGET', KEYS[3], 'ret_len') or ARGV[1])

local replies = {0}
local pieces = {}
local last_id, last_body
local counts = {}
local stored, created_any, last_ms = 0, false, 0
local k = 8
local n = (#ARGV - 6) / 6
for i = 0, n - 1 do
  local a = 6 + i * 6
  local which, participant, event, body = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local nkeys = tonumber(ARGV[a + 5])
  local dedup = nkeys > 0 and KEYS[k] or nil
  local prev = false
  for j = 0, nkeys - 1 do
    if not prev then
      prev = redis.call('GET', KEYS[k + j])
    end
  end
  k = k + nkeys
  if prev then
    replies[#replies + 1] = {prev, 0, 1}
  elseif which == 'existing' and not stream_exists and not has_record() then
    replies[#replies + 1] = 'missing'
  elseif which == 'new' and (stream_exists or has_record()) then
    replies[#replies + 1] = 'exists'
  else
    local id
    if maxlen > 0 then
      id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*',
        'participant', participant, 'event', event, 'body', body)
    else
      id = redis.call('XADD', KEYS[1], '*',
        'participant', participant, 'event', event, 'body', body)
    end
    local created = not stream_exists
    if created then
      stream_exists, created_any = true, true
      if ARGV[2] ~= '' then
        -- At 0, not $: the entry just written is the group's first to read.
        redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[2], '0')
      end
    end
    last_ms = tonumber(string.match(id, '^(%d+)'))
    if which == 'new' then
      -- Created when its first entry was: the time part of the entry's id.
      redis.call('HSET', KEYS[3], 'created', last_ms, 'updated', last_ms,
        'metadata', ARGV[a + 6], 'version', 1)
      record = true
    end
    counts['p:' .. participant] = (counts['p:' .. participant] or 0) + 1
    counts['e:' .. event] = (counts['e:' .. event] or 0) + 1
    if dedup then
      redis.call('SET', dedup, id, 'EX', ARGV[3])
    end
    stored = stored + 1
    last_id, last_body = id, body
    pieces[#pieces + 1] = id .. ' ' .. #body .. '\n' .. body
    replies[#replies + 1] = {id, created and 1 or 0, 0}
  end
end
if stored == 0 then
  return replies
end

local maxage = tonumber(redis.call('HGET', KEYS[3], 'ret_age_ms') or ARGV[4])
if maxage > 0 then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', tostring(last_ms - maxage))
end
for field, count in pairs(counts) do
  redis.call('HINCRBY', KEYS[2], field, count)
end
-- SET ... GET answers the previous value: none means the room was silent for the window.
local woke = not redis.call('SET', KEYS[4], '1', 'PX', ARGV[6], 'GET')
if woke and not created_any then
  replies[1] = 1
end
local idle = tonumber(ARGV[5])
if idle > 0 then
  -- Everything the room owns under a fixed name lives as long as the room has traffic; keys
  -- with their own names (dedup, turn leases, flags) get ttls no longer than this.
  for i = 1, 7 do
    if i ~= 4 then
      redis.call('PEXPIRE', KEYS[i], idle)
    end
  end
end
if stored == 1 then
  redis.call('SPUBLISH', KEYS[1], last_id .. '\n' .. last_body)
else
  redis.call('SPUBLISH', KEYS[1], '-b\n' .. table.concat(pieces))
end
return replies
