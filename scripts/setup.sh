#!/usr/bin/env bash
# Installs what chat-relay needs and is missing; safe to run again (it only adds what is absent).
#
#   scripts/setup.sh          what running the relay needs: redis-server, redis-cli
#   scripts/setup.sh --test   also what the test suite needs: the local LLM (built once, cached)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*" >&2; }

want_test=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) say "unknown option: $arg"; exit 2 ;;
  esac
done

apt_updated=0
apt_install() {
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then sudo=(sudo); else
      say "need root (or sudo) to install: $*"; exit 1
    fi
  fi
  if [ "$apt_updated" -eq 0 ]; then
    say "apt-get update"
    "${sudo[@]}" apt-get update -qq
    apt_updated=1
  fi
  say "installing: $*"
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v curl >/dev/null || missing+=(curl)
if [ "$want_test" -eq 1 ]; then
  # The local model build (scripts/llm-local.sh) needs a C++ toolchain and python venvs.
  command -v g++ >/dev/null || missing+=(g++)
  python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}"
fi

# Debian's package starts a system redis on 6379 where systemd runs; the relay's scripts and
# tests start their own servers, so it does not matter either way.

if [ "$want_test" -eq 1 ]; then
  scripts/llm-local.sh prepare
fi
say "ready"
