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
-- KEYS[8], KEYS[9]  the room's two cid generations (hashes: cid field -> id, `_g` -> generation)
-- ARGV[1]  MAXLEN ~ retention (0 = unbounded)
-- ARGV[2]  consumer group to create with a new room ('' = none)
-- ARGV[3]  dedup window in seconds
-- ARGV[4]  retention by age, ms (0 = none)   ARGV[5]  room idle ttl, ms (0 = never expire)
-- ARGV[6]  wake window, ms: a room with no entry for that long is announced again
-- ARGV[7]  which room, for every entry of the batch: 'any' (create it if needed), 'existing'
--          (the stream or the record must exist), 'new' (neither may exist; the record is
--          written with the first entry stored)
-- ARGV[8]  with 'new', the session's metadata (a JSON object), else ''
-- ARGV[9]  the token under which the calling node holds the bodies for its own feed, if it
--          follows the room's channel ('' = it does not; see held.rs)
-- ARGV[10] the entries' kinds: one byte per entry, the number (from 1) of its kind below
-- then 2 per entry: body (the envelope JSON); its cid field (`<sender length>:<sender>:<cid>`,
--   '' = not idempotent)
-- then 2 per kind: participant (role); event. A batch names each pair once (most batches have
--   one or two): every argument costs Redis a string object and Lua a hashed string.
--
-- Dedup: time (Redis's clock) is cut into generations one dedup window long; generation g
-- writes to KEYS[8 + g % 2], whose `_g` says which generation it holds, and a cid is looked up
-- in the current and the previous generation, so a resend within the window is always found
-- (and one up to two windows late may be). Each hash expires two windows after its last write.
-- Per batch that is two HMGETs and one HSET, however many entries carry a cid.
--
-- Why a script: the SPUBLISH must leave Redis in stream order. Two relays appending to one room
-- concurrently could otherwise publish in the opposite order of their XADDs, and every node
-- delivers live entries in publish order. The dedup check must be atomic with the XADD, or a
-- resend racing the original could store twice; the existence check too, or an append racing a
-- DELETE could bring a deleted session back. Why a batch: the per-call work (the checks, the
-- counters, the expiries, the publish) is paid once for every entry that was ready.
--
-- Publishes `<id>\n<body>` for a single entry, else `-b\n` then `<id> <byte length>\n<body>` per
-- entry (see feed.rs), built with one table.concat. Every string Lua makes is hashed in full,
-- the bodies included, so when the caller holds them (ARGV[9]) and is the channel's only
-- subscriber, it publishes `-i <token>\n` and the batch's ids alone (`-` for an entry not
-- stored). Returns {woke, held, r1, r2, …}: woke = 1 when the room had no entry for the wake
-- window (and this batch did not create it); held = 1 when it published the ids alone; per
-- entry its id,
-- prefixed with `c` when it created the stream, or `d` and the original entry's id when
-- (sender, cid) was already stored, or the string 'missing' ('existing': no such room) or
-- 'exists' ('new': the room is already there).
local HEAD = 10
local ABOUT = 'cids stored in one dedup window: <sender length>:<sender>:<cid> -> stream id'
local kinds = ARGV[10]
local n = #kinds
-- Kind k is ARGV[KINDS + 2k - 1] (participant), ARGV[KINDS + 2k] (event).
local KINDS = HEAD + 2 * n
local which = ARGV[7]
local window_ms = tonumber(ARGV[3]) * 1000

-- The cids already stored (field -> id), from both generations and then from this batch.
local known = {}
local fields = {}
for i = 0, n - 1 do
  local field = ARGV[HEAD + 2 * i + 2]
  if field ~= '' then
    fields[#fields + 1] = field
  end
end
local gen, current, current_gen
if #fields > 0 then
  local now = redis.call('TIME')
  gen = math.floor((tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)) / window_ms)
  current = KEYS[8 + gen % 2]
  local previous = KEYS[8 + (gen + 1) % 2]
  for _, key in ipairs({previous, current}) do
    local got = redis.call('HMGET', key, '_g', unpack(fields))
    local g = tonumber(got[1])
    if key == current then
      current_gen = g
    end
    -- A hash left from an older generation is stale: its cids are outside the window.
    if g and g >= gen - 1 then
      for j = 1, #fields do
        if got[j + 1] then
          known[fields[j]] = got[j + 1]
        end
      end
    end
  end
end

local stream_exists = redis.call('EXISTS', KEYS[1]) == 1
local record
local function has_record()
  if record == nil then
    record = redis.call('EXISTS', KEYS[3]) == 1
  end
  return record
end
local retention = redis.call('HMGET', KEYS[3], 'ret_len', 'ret_age_ms')
local maxlen = tonumber(retention[1] or ARGV[1])

-- Who else needs the bodies: PUBSUB counts this shard's subscribers, the caller among them.
local held = ARGV[9] ~= '' and redis.call('PUBSUB', 'SHARDNUMSUB', KEYS[1])[2] == 1
local replies = {0, held and 1 or 0}
local pieces = {'-b\n'}
local ids = {}
local writes = {}
local last_id, last_body
-- Entries stored per kind, counted per participant and per event at the end.
local by_kind = {}
local stored, created_any = 0, false
for i = 0, n - 1 do
  local body, field = ARGV[HEAD + 2 * i + 1], ARGV[HEAD + 2 * i + 2]
  local kind = string.byte(kinds, i + 1)
  local participant, event = ARGV[KINDS + 2 * kind - 1], ARGV[KINDS + 2 * kind]
  local original = field ~= '' and known[field]
  -- The entry's place in a held batch's `-i` line: its id once stored.
  local published = '-'
  if original then
    replies[#replies + 1] = 'd' .. original
  elseif which == 'existing' and not stream_exists and not has_record() then
    replies[#replies + 1] = 'missing'
  elseif which == 'new' and (stream_exists or has_record()) then
    replies[#replies + 1] = 'exists'
  else
    local id = redis.call('XADD', KEYS[1], '*',
      'participant', participant, 'event', event, 'body', body)
    local created = not stream_exists
    if created then
      stream_exists, created_any = true, true
      if ARGV[2] ~= '' then
        -- At 0, not $: the entry just written is the group's first to read.
        redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[2], '0')
      end
    end
    if which == 'new' then
      -- Created when its first entry was: the time part of the entry's id.
      local ms = tonumber(string.match(id, '^(%d+)'))
      redis.call('HSET', KEYS[3], 'created', ms, 'updated', ms,
        'metadata', ARGV[8], 'version', 1)
      record = true
    end
    by_kind[kind] = (by_kind[kind] or 0) + 1
    if field ~= '' then
      known[field] = id
      writes[#writes + 1] = field
      writes[#writes + 1] = id
    end
    stored = stored + 1
    last_id, last_body = id, body
    if held then
      published = id
    else
      local p = #pieces
      pieces[p + 1], pieces[p + 2], pieces[p + 3], pieces[p + 4], pieces[p + 5] =
        id, ' ', #body, '\n', body
    end
    replies[#replies + 1] = created and 'c' .. id or id
  end
  if held then
    ids[#ids + 1] = published
  end
end
if stored == 0 then
  replies[2] = 0 -- nothing published: nothing to pair
  return replies
end

if #writes > 0 then
  if current_gen == gen then
    redis.call('HSET', current, unpack(writes))
  else
    if current_gen then
      redis.call('DEL', current)
    end
    -- A new generation. `_about` (for whoever reads the room with redis-cli) is longer than
    -- hash-max-listpack-value's default 64 bytes, which makes Redis keep the hash as a hash
    -- table from the start: a listpack (up to 512 fields by default) is searched linearly, and
    -- every batch looks up and writes all its cids, so a busy room would pay that scan per cid.
    redis.call('HSET', current, '_about', ABOUT, '_g', gen, unpack(writes))
  end
  redis.call('PEXPIRE', current, 2 * window_ms)
end
-- Trimmed once per batch rather than per XADD: the same approximate bound, one call.
if maxlen > 0 then
  redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', maxlen)
end
local maxage = tonumber(retention[2] or ARGV[4])
if maxage > 0 then
  local last_ms = tonumber(string.match(last_id, '^(%d+)'))
  redis.call('XTRIM', KEYS[1], 'MINID', '~', tostring(last_ms - maxage))
end
-- Keyed by the bare name: the `p:`/`e:` prefixes are joined once per name, not per entry
-- (every concatenation is a new string).
local by_participant, by_event = {}, {}
for kind, count in pairs(by_kind) do
  local participant, event = ARGV[KINDS + 2 * kind - 1], ARGV[KINDS + 2 * kind]
  by_participant[participant] = (by_participant[participant] or 0) + count
  by_event[event] = (by_event[event] or 0) + count
end
for name, count in pairs(by_participant) do
  redis.call('HINCRBY', KEYS[2], 'p:' .. name, count)
end
for name, count in pairs(by_event) do
  redis.call('HINCRBY', KEYS[2], 'e:' .. name, count)
end
-- SET ... GET answers the previous value: none means the room was silent for the window.
local woke = not redis.call('SET', KEYS[4], '1', 'PX', ARGV[6], 'GET')
if woke and not created_any then
  replies[1] = 1
end
local idle = tonumber(ARGV[5])
if idle > 0 then
  -- Everything the room owns under a fixed name lives as long as the room has traffic; keys
  -- with their own names (turn leases, flags) get ttls no longer than this, and the cid
  -- generations two dedup windows, each clamped to it by the relay.
  for i = 1, 7 do
    if i ~= 4 then
      redis.call('PEXPIRE', KEYS[i], ARGV[5])
    end
  end
end
if held then
  redis.call('SPUBLISH', KEYS[1], '-i ' .. ARGV[9] .. '\n' .. table.concat(ids, ' '))
elseif stored == 1 then
  redis.call('SPUBLISH', KEYS[1], last_id .. '\n' .. last_body)
else
  redis.call('SPUBLISH', KEYS[1], table.concat(pieces))
end
return replies
