#!/usr/bin/env bash
# Print a room the way the prior check_redis_chat did, with redis-cli only.
#
#   scripts/inspect.sh SID             every entry: id, participant, event, text; then counts
#   scripts/inspect.sh SID --follow    then keep printing new entries as they arrive (XREAD BLOCK)
#   scripts/inspect.sh SID --groups    consumer groups, consumers and pending entries (XINFO)
#
# Environment: REDIS_URL (default redis://127.0.0.1:6379), RELAY_KEY_PREFIX (default chat:session:)
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
sid="$1"; shift
follow=0; groups=0
for arg in "$@"; do
  case "$arg" in
    --follow) follow=1 ;;
    --groups) groups=1 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done
url="${REDIS_URL:-${RELAY_REDIS_URL:-redis://127.0.0.1:6379}}"
key="${RELAY_KEY_PREFIX:-chat:session:}$sid"
cli() { redis-cli -u "$url" --no-auth-warning "$@"; }

# Server-side Lua (cjson) pulls bd.text out of each body, so no JSON tool is needed here.
# Prints one line per entry: "<id>  <participant>  <event>  <text>".
read -r -d '' FORMAT <<'LUA' || true
local out = {}
local entries
if ARGV[1] == '' then
  entries = redis.call('XRANGE', KEYS[1], '-', '+')
else
  entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+')
end
for _, e in ipairs(entries) do
  local f = {}
  for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
  local text = ''
  local ok, env = pcall(cjson.decode, f['body'] or '')
  if ok and type(env) == 'table' and type(env['bd']) == 'table' then
    local bd = env['bd']
    text = bd['text'] or bd['message'] or bd['delta'] or ''
    if type(text) ~= 'string' then text = cjson.encode(text) end
    if bd['reason'] then text = text .. '  [' .. tostring(bd['reason']) .. ']' end
  elseif not ok then
    text = f['body'] or ''
  end
  text = string.gsub(text, '\n', ' ')
  table.insert(out, e[1] .. '  ' .. (f['participant'] or '?') .. '  ' .. (f['event'] or '?') .. '  ' .. text)
end
return out
LUA

read -r -d '' COUNTS <<'LUA' || true
-- Only what people and the LLM said; joins, leaves and cancels are not messages.
local said = {['chat.message'] = true, ['llm.request'] = true, ['llm.response'] = true}
local counts, order = {}, {}
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  local f = {}
  for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
  if said[f['event'] or ''] then
    local p = f['participant'] or '?'
    if not counts[p] then counts[p] = 0; table.insert(order, p) end
    counts[p] = counts[p] + 1
  end
end
local out = {}
for _, p in ipairs(order) do table.insert(out, p .. ': ' .. counts[p]) end
return out
LUA

if [ "$(cli EXISTS "$key")" != "1" ]; then
  echo "no such room: $key" >&2
  exit 1
fi

if [ "$groups" -eq 1 ]; then
  echo "== consumer groups of $key"
  cli XINFO GROUPS "$key"
  for g in $(cli --raw XINFO GROUPS "$key" | awk 'prev=="name"{print} {prev=$0}'); do
    echo "== consumers of group $g"
    cli XINFO CONSUMERS "$key" "$g"
    echo "== pending entries of group $g"
    cli XPENDING "$key" "$g" - + 100
  done
  exit 0
fi

echo "== $key ($(cli XLEN "$key") entries)"
cli --raw EVAL "$FORMAT" 1 "$key" ""
echo "== messages per participant"
cli --raw EVAL "$COUNTS" 1 "$key"

if [ "$follow" -eq 1 ]; then
  echo "== following (Ctrl-C to stop)"
  last=$(cli --raw XREVRANGE "$key" + - COUNT 1 | head -n 1)
  while true; do
    # XREAD BLOCK wakes as soon as something is appended; then format what is new.
    cli XREAD BLOCK 30000 STREAMS "$key" "${last:-0}" >/dev/null
    newest=$(cli --raw XREVRANGE "$key" + - COUNT 1 | head -n 1)
    if [ -n "$newest" ] && [ "$newest" != "$last" ]; then
      cli --raw EVAL "$FORMAT" 1 "$key" "${last:-0}"
      last="$newest"
    fi
  done
fi
