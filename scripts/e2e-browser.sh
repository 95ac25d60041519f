#!/usr/bin/env bash
# Browser end-to-end test of the room page: two headless Chromium pages chat, ask the real local
# LLM, and reload; then one page reloads in the middle of a slow (fake) LLM reply and must show
# the text so far at once and grow to the exact final text (test-clients/web/e2e/room.test.mjs).
#
#   scripts/e2e-browser.sh
#
# Installs what is missing (Debian's chromium, fonts for the screenshots, the test's npm
# packages), then starts its own redis-server, local LLM (scripts/llm-local.sh) and relay on free
# ports, runs `node --test`, and stops everything it started. Exits with the test's exit code.
#
# environment:
#   ARTIFACTS_DIR   where screenshots go (default: target/e2e-artifacts)
#   CHROMIUM_PATH   browser binary (default: /usr/bin/chromium)
#   E2E_KEEP_LOGS   1: keep the work dir with the relay/redis logs even when the test passes
#   RELAY_BIN       use this chat-relay binary instead of target/debug/chat-relay (the workspace
#                   is built here unless FAKE_LLM_BIN is set as well)
#   FAKE_LLM_BIN    use this fake-llm binary instead of target/debug/fake-llm (built here)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
E2E_DIR="$ROOT/test-clients/web/e2e"
ARTIFACTS_DIR="${ARTIFACTS_DIR:-target/e2e-artifacts}"
mkdir -p "$ARTIFACTS_DIR"
ARTIFACTS_DIR="$(cd "$ARTIFACTS_DIR" && pwd)"
export CHROMIUM_PATH="${CHROMIUM_PATH:-/usr/bin/chromium}"

say() { printf '[e2e] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# ------------------------------------------------------------------------------- setup

apt_updated=0
apt_install() {
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    have sudo || die "need root (or sudo) to install: $*"
    sudo=(sudo)
  fi
  if [ "$apt_updated" -eq 0 ]; then
    say "apt-get update"
    "${sudo[@]}" apt-get update -qq
    apt_updated=1
  fi
  say "installing: $*"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

missing=()
[ -x "$CHROMIUM_PATH" ] || missing+=(chromium)
have redis-server || missing+=(redis-server)
have curl || missing+=(curl)
have python3 || missing+=(python3)
have node || missing+=(nodejs)
have npm || missing+=(npm)
# Without these the screenshots show boxes for the Hangul and emoji test messages.
if have fc-list; then
  [ -n "$(fc-list :lang=ko family 2>/dev/null)" ] || missing+=(fonts-nanum)
  fc-list 2>/dev/null | grep -qi 'emoji' || missing+=(fonts-noto-color-emoji)
else
  missing+=(fonts-nanum fonts-noto-color-emoji)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}"
fi

node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 20 ] || die "node $(node --version) is too old: the test needs node >= 20"

# npm ci only when node_modules does not match the lockfile (stamp = hash of package-lock.json).
lock_hash="$(sha256sum "$E2E_DIR/package-lock.json" | cut -d' ' -f1)"
stamp="$E2E_DIR/node_modules/.e2e-lock-sha256"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$lock_hash" ]; then
  say "npm ci in ${E2E_DIR#"$ROOT"/}"
  (cd "$E2E_DIR" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$lock_hash" >"$stamp"
fi

# The same build as every other script (--workspace --bins): one set of features, so the
# relay's crates are compiled once per suite, not once per package selection.
if [ -z "${RELAY_BIN:-}" ] || [ -z "${FAKE_LLM_BIN:-}" ]; then
  say "cargo build --workspace --bins"
  cargo build --quiet --workspace --bins
fi
if [ -n "${RELAY_BIN:-}" ]; then
  [ -x "$RELAY_BIN" ] || die "RELAY_BIN=$RELAY_BIN is not an executable"
  say "using RELAY_BIN=$RELAY_BIN"
else
  RELAY_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/chat-relay"
  [ -x "$RELAY_BIN" ] || die "no $RELAY_BIN after cargo build"
fi
# A slow, predictable fake LLM for the reload-mid-reply step (the real model is too quick to
# reload in the middle of its reply reliably).
FAKE_LLM_BIN="${FAKE_LLM_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/fake-llm}"
[ -x "$FAKE_LLM_BIN" ] || die "no fake-llm at $FAKE_LLM_BIN"

# ------------------------------------------------------------------------------- services

WORK="$(mktemp -d "${TMPDIR:-/tmp}/chat-relay-e2e.XXXXXX")"
redis_pid=""
relay_pid=""
slow_relay_pid=""
fake_pid=""
llm_port=""

# shellcheck disable=SC2317 # stop_pid and cleanup run from the EXIT trap
stop_pid() { # PID NAME: TERM, wait up to 10 s, then KILL
  local pid="$1" name="$2" i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  say "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$relay_pid" ] && stop_pid "$relay_pid" relay
  [ -n "$slow_relay_pid" ] && stop_pid "$slow_relay_pid" "slow relay"
  [ -n "$fake_pid" ] && stop_pid "$fake_pid" fake-llm
  [ -n "$redis_pid" ] && stop_pid "$redis_pid" redis-server
  [ -n "$llm_port" ] && { scripts/llm-local.sh stop "$llm_port" || true; }
  if [ "$rc" -ne 0 ] || [ "${E2E_KEEP_LOGS:-0}" = 1 ]; then
    say "logs kept in $WORK (relay.log, redis.log)"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

show_log() { # FILE: last lines, for a service that failed to start
  say "last lines of $1:"
  tail -n 30 "$1" >&2 || true
}

# Distinct free ports, all bound at once so the kernel cannot hand out the same one twice.
read -r redis_port llm_port_free relay_port fake_port slow_relay_port < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
PY
)

say "redis-server on 127.0.0.1:$redis_port"
redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no \
  --dir "$WORK" --logfile "$WORK/redis.log" </dev/null &
redis_pid=$!
for ((i = 0; ; i++)); do
  if [ "$(redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null || true)" = PONG ]; then break; fi
  kill -0 "$redis_pid" 2>/dev/null || { show_log "$WORK/redis.log"; die "redis-server exited"; }
  [ "$i" -lt 100 ] || { show_log "$WORK/redis.log"; die "redis-server did not answer PING in 10 s"; }
  sleep 0.1
done

say "local LLM on 127.0.0.1:$llm_port_free (scripts/llm-local.sh)"
llm_port="$llm_port_free" # from here on, cleanup stops it
llm_url="$(scripts/llm-local.sh start "$llm_port")"
say "LLM at $llm_url"

say "relay on 127.0.0.1:$relay_port"
"$RELAY_BIN" serve --listen "127.0.0.1:$relay_port" --redis-url "redis://127.0.0.1:$redis_port" \
  --llm-base-url "$llm_url" --llm-idle-timeout-secs 60 </dev/null >"$WORK/relay.log" 2>&1 &
relay_pid=$!
relay_url="http://127.0.0.1:$relay_port"
for ((i = 0; ; i++)); do
  if curl -fsS -o /dev/null --max-time 2 "$relay_url/readyz" 2>/dev/null; then break; fi
  kill -0 "$relay_pid" 2>/dev/null || { show_log "$WORK/relay.log"; die "the relay exited"; }
  [ "$i" -lt 300 ] || { show_log "$WORK/relay.log"; die "no 200 from $relay_url/readyz in 30 s"; }
  sleep 0.1
done
say "relay ready at $relay_url"

say "slow fake LLM on 127.0.0.1:$fake_port, and a relay using it on 127.0.0.1:$slow_relay_port"
"$FAKE_LLM_BIN" --port "$fake_port" --tokens 80 --delay-ms 120 </dev/null >"$WORK/fake-llm.log" 2>&1 &
fake_pid=$!
# Its own key prefix: the other relay's LLM worker must not answer its rooms.
"$RELAY_BIN" serve --listen "127.0.0.1:$slow_relay_port" --redis-url "redis://127.0.0.1:$redis_port" \
  --key-prefix "slow:session:" --llm-base-url "http://127.0.0.1:$fake_port/v1" </dev/null >"$WORK/slow-relay.log" 2>&1 &
slow_relay_pid=$!
slow_relay_url="http://127.0.0.1:$slow_relay_port"
for ((i = 0; ; i++)); do
  if curl -fsS -o /dev/null --max-time 2 "$slow_relay_url/readyz" 2>/dev/null; then break; fi
  kill -0 "$slow_relay_pid" 2>/dev/null || { show_log "$WORK/slow-relay.log"; die "the slow relay exited"; }
  [ "$i" -lt 300 ] || { show_log "$WORK/slow-relay.log"; die "no 200 from $slow_relay_url/readyz in 30 s"; }
  sleep 0.1
done

# ------------------------------------------------------------------------------- test

rm -f "$ARTIFACTS_DIR"/{a,b,b-after-reload}.{png,html}
say "node --test room.test.mjs (RELAY_URL=$relay_url)"
set +e
(cd "$E2E_DIR" && RELAY_URL="$relay_url" SLOW_RELAY_URL="$slow_relay_url" ARTIFACTS_DIR="$ARTIFACTS_DIR" node --test room.test.mjs)
test_rc=$?
set -e

shots=("$ARTIFACTS_DIR"/*.png)
if [ -e "${shots[0]}" ]; then
  say "screenshots in $ARTIFACTS_DIR:"
  printf '  %s\n' "${shots[@]}" >&2
else
  say "no screenshots were written (to $ARTIFACTS_DIR)"
fi
if [ "$test_rc" -ne 0 ]; then
  show_log "$WORK/relay.log"
  say "FAILED (node --test exit code $test_rc)"
else
  say "passed"
fi
exit "$test_rc"
