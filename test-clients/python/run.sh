#!/usr/bin/env bash
# Run a Python test client against a running relay, in a cached virtualenv: the smoke test by
# default, or another script of this folder named first.
#
#   test-clients/python/run.sh [--url ws://127.0.0.1:3000] [--redis redis://127.0.0.1:6379]
#                              [--sid ROOM] [--prefix chat:session:] [--timeout 10]
#   test-clients/python/run.sh voice_client.py [--url ws://127.0.0.1:3000]
#   test-clients/python/run.sh eval_client.py [--url ws://127.0.0.1:3000]
#
# The venv lives in ${CHAT_RELAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chat-relay}/py-venv and
# is created on first use; requirements.txt is installed again only when it changed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${CHAT_RELAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chat-relay}"
venv="$cache/py-venv"
stamp="$venv/.requirements.sha256"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$cache"
  echo "creating virtualenv $venv" >&2
  if ! "$python" -m venv "$venv"; then
    echo "error: '$python -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
    rm -rf "$venv"
    exit 1
  fi
fi

want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
  echo "installing $here/requirements.txt into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
  echo "$want" > "$stamp"
fi

script=smoke_test.py
if [[ "${1:-}" == *.py ]]; then
  script="$1"
  shift
fi
exec "$venv/bin/python" "$here/$script" "$@"
