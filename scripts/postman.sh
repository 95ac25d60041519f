#!/usr/bin/env bash
# Run the Postman collection (test-clients/postman) with newman against a real relay, Redis and
# the fake OpenAI server started here, so every request's tests run, the sessions & chat API
# folder included.
#
#   scripts/postman.sh
#
# newman is installed with npm into the cache on first use ($CHAT_RELAY_CACHE/newman, default
# ${XDG_CACHE_HOME:-$HOME/.cache}/chat-relay/newman). redis-server, the relay and fake-llm run on
# free ports and are stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

readonly NEWMAN_VERSION="6"
say() { printf '[postman] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cache="${CHAT_RELAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chat-relay}/newman"
newman="$cache/node_modules/.bin/newman"
if [ ! -x "$newman" ]; then
  command -v npm >/dev/null || die "npm is needed to install newman (node 18+)"
  say "installing newman@$NEWMAN_VERSION into $cache"
  mkdir -p "$cache"
  npm install --prefix "$cache" --no-audit --no-fund --loglevel=error "newman@$NEWMAN_VERSION" >&2
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

wait_for() { # URL, what
  for _ in $(seq 150); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "$2 did not come up ($1)"
}

say "building the relay and fake-llm"
cargo build --quiet --workspace --bins
bins="${CARGO_TARGET_DIR:-target}/debug"
redis_port=$(free_port)
llm_port=$(free_port)
relay_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  --logfile "$work/redis.log" &
pids+=($!)
# Numbered tokens ("tok0 tok1 ..."), 20 ms apart: replies stream in several deltas.
"$bins/fake-llm" --port "$llm_port" --delay-ms 20 --tokens 20 >"$work/fake-llm.log" 2>&1 &
pids+=($!)
RELAY_LOG=chat_relay=warn "$bins/chat-relay" serve --listen "127.0.0.1:$relay_port" \
  --redis-url "redis://127.0.0.1:$redis_port" --llm-base-url "http://127.0.0.1:$llm_port/v1" \
  2>"$work/relay.log" &
pids+=($!)
wait_for "http://127.0.0.1:$relay_port/readyz" "the relay"
for _ in $(seq 100); do
  grep -q "listening" "$work/fake-llm.log" 2>/dev/null && break
  sleep 0.1
done

# The room folder pages through room001's history: give it some.
for text in "hello from A" "hello from B" "paging works"; do
  curl -fsS -o /dev/null -X POST "http://127.0.0.1:$relay_port/v1/sessions/room001/messages" \
    -H 'content-type: application/json' \
    -d "{\"hd\":{\"event\":\"chat.message\",\"role\":\"A\"},\"bd\":{\"text\":\"$text\"}}"
done

say "newman run test-clients/postman/chat-relay.postman_collection.json"
if ! "$newman" run test-clients/postman/chat-relay.postman_collection.json \
  --env-var "host=127.0.0.1:$relay_port" --timeout-request 60000 --color off; then
  say "relay log:"; cat "$work/relay.log" >&2
  exit 1
fi
