#!/usr/bin/env bash
# The README's first command: set up, make sure Redis and an LLM are there, run the relay.
#
#   scripts/run.sh [chat-relay serve flags...]
#
# - Redis: uses RELAY_REDIS_URL (default redis://127.0.0.1:6379); if nothing answers there, starts
#   a local redis-server on that port (AOF on, data under ~/.local/share/chat-relay/redis) and
#   stops it on exit.
# - LLM: uses RELAY_LLM_BASE_URL if set (OpenAI, Ollama, vLLM, ...). Otherwise it builds (first
#   run only, ~9 minutes, cached) and starts a real local model server (llama.cpp + SmolLM2-135M)
#   in the background. The relay starts at once: until the model is up, LLM turns end with
#   `llm_unavailable` and chat works as usual.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[run] %s\n' "$*" >&2; }

scripts/setup.sh

redis_url="${RELAY_REDIS_URL:-redis://127.0.0.1:6379}"
hostport="${redis_url#redis://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
redis_host="${hostport%%:*}"; redis_port="${hostport##*:}"
[ "$redis_port" = "$hostport" ] && redis_port=6379

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ -n "${llm_port:-}" ]; then scripts/llm-local.sh stop "$llm_port" >/dev/null 2>&1 || true; fi
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if redis-cli -u "$redis_url" ping >/dev/null 2>&1; then
  say "using Redis at $redis_url"
else
  case "$redis_host" in
    127.0.0.1|localhost) ;;
    *) say "Redis at $redis_url does not answer, and it is not local: start it first"; exit 1 ;;
  esac
  data="${XDG_DATA_HOME:-$HOME/.local/share}/chat-relay/redis"
  mkdir -p "$data"
  say "starting redis-server on 127.0.0.1:$redis_port (data: $data)"
  redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$data" \
    --appendonly yes --appendfsync everysec --save "" --maxmemory-policy noeviction \
    --logfile "$data/redis.log" &
  pids+=($!)
  for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

if [ -z "${RELAY_LLM_BASE_URL:-}" ] && [ "${RELAY_LLM:-on}" != "off" ]; then
  llm_port="${CHAT_RELAY_LLM_PORT:-8001}"
  export RELAY_LLM_BASE_URL="http://127.0.0.1:$llm_port/v1"
  export RELAY_LLM_MODEL="${RELAY_LLM_MODEL:-smollm2}"
  if ! scripts/llm-local.sh ready; then
    say "building the local LLM in the background (first run only, ~9 minutes); chat works meanwhile"
  fi
  ( scripts/llm-local.sh start "$llm_port" >/dev/null && say "local LLM ready at $RELAY_LLM_BASE_URL" ) &
  pids+=($!)
fi

say "building the relay (release)"
cargo build --release --quiet
listen="${RELAY_LISTEN:-0.0.0.0:3000}"
say "open http://127.0.0.1:${listen##*:}/ in two browser tabs (Ctrl-C stops everything)"
"${CARGO_TARGET_DIR:-target}/release/chat-relay" serve "$@" &
pids+=($!)
wait "${pids[-1]}"
