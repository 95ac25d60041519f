#!/usr/bin/env bash
# The prior design's Python smoke test and the voice and evaluation dialect clients against a
# real relay and Redis started here (the relay's LLM participant talks to the fake OpenAI
# server, tools' fake-llm), plus the Postman collection's structure check.
#
#   scripts/smoke-python.sh
#
# Starts its own redis-server, fake-llm and relay on free ports and stops them (by PID) on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[smoke] %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

say "checking the Postman collection"
python3 test-clients/postman/validate.py

cargo build --quiet --workspace --bins
bins="${CARGO_TARGET_DIR:-target}/debug"
redis_port=$(free_port)
relay_port=$(free_port)
llm_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  --logfile "$work/redis.log" &
pids+=($!)
# Replies of 20 tokens, 50 ms apart: long enough for the evaluation client to cancel one.
"$bins/fake-llm" --port "$llm_port" --delay-ms 50 --tokens 20 >"$work/fake-llm.log" 2>&1 &
pids+=($!)
RELAY_LOG=chat_relay=warn "$bins/chat-relay" serve --listen "127.0.0.1:$relay_port" \
  --redis-url "redis://127.0.0.1:$redis_port" --llm-base-url "http://127.0.0.1:$llm_port/v1" \
  2>"$work/relay.log" &
pids+=($!)
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$relay_port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

say "running test-clients/python/smoke_test.py"
if ! test-clients/python/run.sh --url "ws://127.0.0.1:$relay_port" --redis "redis://127.0.0.1:$redis_port"; then
  say "relay log:"; cat "$work/relay.log" >&2
  exit 1
fi
for client in voice_client.py eval_client.py; do
  say "running test-clients/python/$client"
  if ! test-clients/python/run.sh "$client" --url "ws://127.0.0.1:$relay_port"; then
    say "relay log:"; cat "$work/relay.log" >&2
    exit 1
  fi
done
