#!/usr/bin/env bash
# Benchmarks the relay with its load generator (tools/src/bin/loadgen/) against a redis-server and
# a release relay that this script starts on free loopback ports and stops (by PID) on exit, and
# runs the lean reference relay (reference-relay, read-only in shared/) beside it in the same
# invocation, on the same Redis and load generator, so every figure is also a ratio to it.
#
#   scripts/bench.sh                full run: S1-S4 for chat-relay, S1-S3 for the reference; Markdown
#                                   tables on stdout (absolute figures, then chat-relay ÷ reference),
#                                   writes BENCHMARKS.md
#   scripts/bench.sh --short        CI: tiny S1 and S2 on chat-relay only; fails only on loss,
#                                   duplicates, reordering, error frames or failed connections,
#                                   never on speed; needs no reference relay
#   options:
#     --big          S3 with 20,000 idle connections over four loopback source addresses
#                    (capped by the open-file limit)
#     --perf         record the relay with `perf` during S1; top symbols into the report
#     --out FILE     where to write the report (default BENCHMARKS.md; --short writes none)
#     --no-build     use the existing binaries (target/, or $CARGO_TARGET_DIR, and target/reference-relay)
#     --no-reference skip the reference relay (absolute figures only)
#     --keep-logs    keep the relay/redis/loadgen logs (otherwise kept only on failure)
#
# The reference relay is found in $RELAY_REFERENCE_DIR, else in shared/reference-relay beside the
# repository or one of its parents (../shared, ../../shared for a worktree); when it is absent
# (e.g. a CI clone) the run says so and reports absolute figures only. It is built as its README
# says: cargo build --release --manifest-path <dir>/Cargo.toml --target-dir target/reference-relay,
# and runs with --xadd (XADD each message, 32 in flight per socket, broadcast in memory).
#
# Scenarios (each bounded by loadgen --timeout and `timeout`, each well under a minute):
#   S1 many rooms   50 rooms x 4 clients, every client sends 200 x 256 B, window 32
#   S2 big room     1 room x 200 clients, 20 senders, 2,000 msg/s in total for 10 s
#   S3 idle         5,000 idle connections: relay KiB per connection, time to connect them all
#   S4 LLM fan-out  1 room × 100 clients, 10 concurrent turns from a fast fake OpenAI server
#                   (chat-relay only: the reference has no LLM)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[bench] %s\n' "$*" >&2; }

short=0 big=0 perf=0 build=1 keep_logs=0 reference=1 out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --short) short=1 ;;
    --big) big=1 ;;
    --perf) perf=1 ;;
    --no-build) build=0 ;;
    --no-reference) reference=0 ;;
    --keep-logs) keep_logs=1 ;;
    --out) out="${2:?--out needs a file}"; shift ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) say "unknown option: $1"; exit 2 ;;
  esac
  shift
done
if [ -z "$out" ] && [ "$short" -eq 0 ]; then out=BENCHMARKS.md; fi
# The short form (CI) checks correctness only, so a debug build will do and saves a release build.
profile=release
if [ "$short" -eq 1 ] && [ "${BENCH_PROFILE:-}" != release ]; then profile=debug; fi
# Where cargo puts the binaries (CARGO_TARGET_DIR, if set, moves them).
bins="${CARGO_TARGET_DIR:-target}/$profile"
# The short form never needs the reference.
if [ "$short" -eq 1 ]; then reference=0; fi

find_reference() { # the reference relay's source dir, or nothing
  if [ -n "${RELAY_REFERENCE_DIR:-}" ]; then
    [ -f "$RELAY_REFERENCE_DIR/Cargo.toml" ] && (cd "$RELAY_REFERENCE_DIR" && pwd)
    return 0
  fi
  local dir
  dir="$(cd .. && pwd)"
  while :; do
    if [ -f "$dir/shared/reference-relay/Cargo.toml" ]; then echo "$dir/shared/reference-relay"; return 0; fi
    [ "$dir" = / ] && return 0
    dir="$(dirname "$dir")"
  done
}
ref_dir="" ref_bin="target/reference-relay/release/reference-relay"
if [ "$reference" -eq 1 ]; then
  ref_dir="$(find_reference)"
  if [ -z "$ref_dir" ]; then
    say "reference relay not found (${RELAY_REFERENCE_DIR:-no RELAY_REFERENCE_DIR; looked for shared/reference-relay above the repository}): absolute figures only, no ratios"
    reference=0
  fi
fi

# --- processes and cleanup ------------------------------------------------------------------

logs="$(mktemp -d "${TMPDIR:-/tmp}/chat-relay-bench.XXXXXX")"
redis_pid="" relay_pid="" ref_pid="" perf_pid="" fake_llm_pid="" failed=0

stop_pid() { # PID [signal]: stop one process we started and wait for it
  local pid="$1" sig="${2:-TERM}"
  [ -n "$pid" ] || return 0
  kill -s "$sig" "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -s KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  stop_pid "$perf_pid" INT
  stop_pid "$fake_llm_pid"
  stop_pid "$relay_pid"
  stop_pid "$ref_pid"
  stop_pid "$redis_pid"
  if [ "$keep_logs" -eq 1 ] || [ "$failed" -ne 0 ]; then
    say "logs kept in $logs"
  else
    rm -rf "$logs"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Idle scenarios need one descriptor per connection in both processes, which inherit this limit.
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile="$(ulimit -n)"
say "open-file limit: $nofile"

free_port() { # a loopback TCP port nothing listens on, below the ephemeral range loadgen uses
  local port
  for _ in $(seq 50); do
    port=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return 0; fi
  done
  say "no free port found"; return 1
}

start_redis() {
  redis_port="$(free_port)"
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$logs" --logfile "$logs/redis.log" &
  redis_pid=$!
  for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  say "redis-server did not start (see $logs/redis.log)"; failed=1; exit 1
}

# Every limit lifted: the bench measures the relay's path, not its abuse protection.
relay_flags=(
  --llm off
  --msgs-per-sec 1000000 --msgs-burst 1000000
  --room-msgs-per-sec 1000000 --room-msgs-burst 1000000
  --max-conns-per-ip 100000 --max-conns-per-room 100000
  --max-tcp-conns-per-ip 100000 --handshakes-per-sec 1000000 --handshakes-burst 1000000
  --room-creations-per-sec 1000000 --room-creations-burst 1000000
  --outbound-queue 4096
  --shutdown-grace-secs 2
)

start_relay() { # NAME: a fresh relay process, logs in $logs/relay-NAME.log
  relay_port="$(free_port)"
  RELAY_LOG="${RELAY_LOG:-chat_relay=warn}" "$bins/chat-relay" serve \
    --listen "127.0.0.1:$relay_port" --redis-url "redis://127.0.0.1:$redis_port" \
    "${relay_flags[@]}" >"$logs/relay-$1.log" 2>&1 &
  relay_pid=$!
  for _ in $(seq 300); do
    curl -fsS "http://127.0.0.1:$relay_port/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$relay_pid" 2>/dev/null || break
    sleep 0.1
  done
  say "relay did not become ready:"; tail -20 "$logs/relay-$1.log" >&2; failed=1; exit 1
}

stop_relay() { stop_pid "$relay_pid"; relay_pid=""; }

start_reference() { # NAME: a fresh reference relay (XADD on the same Redis), logs in $logs/reference-NAME.log
  ref_port="$(free_port)"
  "$ref_bin" --bind "127.0.0.1:$ref_port" --xadd --redis-url "redis://127.0.0.1:$redis_port" \
    >"$logs/reference-$1.log" 2>&1 &
  ref_pid=$!
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$ref_port") 2>/dev/null && return 0
    kill -0 "$ref_pid" 2>/dev/null || break
    sleep 0.1
  done
  say "reference relay did not start:"; tail -20 "$logs/reference-$1.log" >&2; failed=1; exit 1
}

stop_reference() { stop_pid "$ref_pid"; ref_pid=""; }

server_of() { # SERVER → "PORT PID loadgen-flags" of the server under test
  case "$1" in
    relay) echo "$relay_port $relay_pid --server relay" ;;
    reference) echo "$ref_port $ref_pid --server reference" ;;
  esac
}

server_name() { case "$1" in relay) echo chat-relay ;; reference) echo reference ;; esac; }

# --- figures --------------------------------------------------------------------------------

jget() { # JSON KEY: one scalar from loadgen's flat JSON line
  sed -n "s/.*\"$2\":\(\"[^\"]*\"\|[^,}]*\).*/\1/p" <<<"$1" | tr -d '"'
}

num() { # a number with thousands separators (integers only)
  local n="${1%%.*}"
  [ -n "$n" ] && [ "$n" != null ] || { echo "-"; return; }
  sed ':a;s/\B[0-9]\{3\}\>/,&/;ta' <<<"$n"
}

dec() { # NUMBER DIGITS
  [ -n "$1" ] && [ "$1" != null ] || { echo "-"; return; }
  awk -v x="$1" -v d="$2" 'BEGIN { printf "%.*f", d, x }'
}

rows_run="" rows_idle="" rows_llm=""
declare -A result

run_scenario() { # NAME SERVER LABEL loadgen-run-args...: one `loadgen run`, one table row
  local name="$1" server="$2" label="$3"; shift 3
  say "$name: $label ($(server_name "$server"))"
  local rc=0 line port pid flags
  read -r port pid flags <<<"$(server_of "$server")"
  # shellcheck disable=SC2086  # $flags is two words
  timeout 90 "$bins/loadgen" run --url "ws://127.0.0.1:$port" $flags \
    --relay-pid "$pid" --redis-pid "$redis_pid" --json "$@" \
    >"$logs/$name.json" 2>"$logs/$name.err" || rc=$?
  line="$(tail -1 "$logs/$name.json")"
  result[$name]="$line"
  local errors verdict=PASS
  errors="$(jget "$line" errors_total)"
  if [ "$rc" -ne 0 ] || [ -z "$line" ] || [ "${errors:-1}" != 0 ]; then
    verdict="FAIL"; failed=1
    say "$name failed (exit $rc): $(jget "$line" errors_text) $(tail -3 "$logs/$name.err" | tr '\n' ' ')"
  fi
  rows_run+="| $label | $(server_name "$server") | $(num "$(jget "$line" connections)") | $(num "$(jget "$line" sent)")"
  rows_run+=" | $(num "$(jget "$line" acked)") | $(num "$errors") | $(num "$(jget "$line" sent_per_sec)")"
  rows_run+=" | $(num "$(jget "$line" deliveries)") / $(num "$(jget "$line" expected_deliveries)")"
  rows_run+=" | **$(num "$(jget "$line" deliveries_per_sec)")**"
  rows_run+=" | $(jget "$line" loss) / $(jget "$line" duplicates) / $(jget "$line" reorders)"
  rows_run+=" | $(dec "$(jget "$line" lat_p50_ms)" 1) / $(dec "$(jget "$line" lat_p90_ms)" 1)"
  rows_run+=" / **$(dec "$(jget "$line" lat_p99_ms)" 1)** / $(dec "$(jget "$line" lat_max_ms)" 1)"
  rows_run+=" | $(dec "$(jget "$line" relay_cpu_cores)" 2) | **$(dec "$(jget "$line" relay_cpu_us_per_delivery)" 2)**"
  rows_run+=" | $(dec "$(jget "$line" relay_cpu_us_per_message)" 1) | $(dec "$(jget "$line" redis_cpu_cores)" 2)"
  rows_run+=" | $(dec "$(jget "$line" redis_cpu_us_per_stored)" 1)"
  rows_run+=" | $(dec "$(jget "$line" loadgen_cpu_cores)" 2) | $(dec "$(jget "$line" others_cpu_cores)" 2) | $verdict |"$'\n'
}

idle_scenario() { # NAME SERVER LABEL loadgen-idle-args...
  local name="$1" server="$2" label="$3"; shift 3
  say "$name: $label ($(server_name "$server"))"
  local rc=0 line verdict=PASS port pid flags
  read -r port pid flags <<<"$(server_of "$server")"
  # shellcheck disable=SC2086  # $flags is two words
  timeout 120 "$bins/loadgen" idle --url "ws://127.0.0.1:$port" $flags \
    --relay-pid "$pid" --json --timeout 60 "$@" >"$logs/$name.json" 2>"$logs/$name.err" || rc=$?
  line="$(tail -1 "$logs/$name.json")"
  result[$name]="$line"
  if [ "$rc" -ne 0 ] || [ -z "$line" ]; then
    verdict=FAIL; failed=1
    say "$name failed (exit $rc): $(tail -3 "$logs/$name.err" | tr '\n' ' ')"
  fi
  local before after
  before="$(jget "$line" relay_rss_before_kib)" after="$(jget "$line" relay_rss_after_kib)"
  rows_idle+="| $label | $(server_name "$server") | $(num "$(jget "$line" ready)") / $(num "$(jget "$line" connections)")"
  rows_idle+=" | $(jget "$line" failed) / $(jget "$line" dropped) | $(dec "$(jget "$line" connect_secs)" 2)"
  rows_idle+=" | $(num "$(jget "$line" connects_per_sec)")"
  rows_idle+=" | $(dec "$(awk -v k="${before:-0}" 'BEGIN{print k/1024}')" 1) → $(dec "$(awk -v k="${after:-0}" 'BEGIN{print k/1024}')" 1)"
  rows_idle+=" | **$(dec "$(jget "$line" relay_kib_per_conn)" 2)** | $(dec "$(jget "$line" relay_cpu_connect_secs)" 2) | $verdict |"$'\n'
}

llm_scenario() { # NAME LABEL loadgen-llm-args...: LLM fan-out against a fake OpenAI server
  local name="$1" label="$2"; shift 2
  say "$name: $label"
  local rc=0 line verdict=PASS
  timeout 120 "$bins/loadgen" llm --url "ws://127.0.0.1:$relay_port" \
    --relay-pid "$relay_pid" --json "$@" >"$logs/$name.json" 2>"$logs/$name.err" || rc=$?
  line="$(tail -1 "$logs/$name.json")"
  result[$name]="$line"
  if [ "$rc" -ne 0 ] || [ -z "$line" ]; then
    verdict=FAIL; failed=1
    say "$name failed (exit $rc): $(tail -3 "$logs/$name.err" | tr '\n' ' ')"
  fi
  rows_llm+="| $label | $(num "$(jget "$line" deltas)") | **$(num "$(jget "$line" deltas_per_sec)")**"
  rows_llm+=" | $(dec "$(jget "$line" lat_p50_ms)" 1) / **$(dec "$(jget "$line" lat_p99_ms)" 1)** / $(dec "$(jget "$line" lat_max_ms)" 1)"
  rows_llm+=" | $(jget "$line" finals) | $(jget "$line" seq_faults) | $(dec "$(jget "$line" relay_cpu_us_per_delta)" 2) | $verdict |"$'\n'
}

table() {
  if [ -n "$rows_run" ]; then
    echo "| Scenario | Server | Conns | Sent | Acked | Errors | Sent/s | Deliveries / expected | Deliveries/s | Loss / dup / reorder | Latency p50 / p90 / p99 / max (ms) | Relay cores | Relay CPU µs / delivery | Relay CPU µs / message | Redis cores | Redis CPU µs / stored message | Loadgen cores | Other processes' cores | Result |"
    echo "|---|---|--:|--:|--:|--:|--:|--:|--:|:-:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|"
    printf '%s' "$rows_run"
  fi
  if [ -n "$rows_llm" ]; then
    echo
    echo "| Scenario | Deltas delivered | Deltas/s | Delta latency p50 / p99 / max (ms) | Final replies seen | Seq faults | Relay CPU µs / delta | Result |"
    echo "|---|--:|--:|--:|--:|--:|--:|:-:|"
    printf '%s' "$rows_llm"
  fi
  if [ -n "$rows_idle" ]; then
    echo
    echo "| Scenario | Server | Ready / asked | Failed / dropped | Connect all (s) | Connects/s | Relay RSS (MiB) | Relay KiB / connection | Relay CPU while connecting (s) | Result |"
    echo "|---|---|--:|:-:|--:|--:|--:|--:|--:|:-:|"
    printf '%s' "$rows_idle"
  fi
}

ratio() { # A B → A ÷ B as "0.36×", or "-" when either is missing
  awk -v a="$1" -v b="$2" 'BEGIN {
    if (a == "" || a == "null" || b == "" || b == "null" || b + 0 == 0) print "-"
    else printf "%.2f×", a / b
  }'
}

figure() { # NUMBER DIGITS (0: an integer with separators)
  if [ "$2" -eq 0 ]; then num "$1"; else dec "$1" "$2"; fi
}

compare_row() { # LABEL BETTER KEY CHAT_RELAY_JSON REFERENCE_JSON DIGITS
  local a b
  a="$(jget "$4" "$3")" b="$(jget "$5" "$3")"
  echo "| $1 | $2 | $(figure "$a" "$6") | $(figure "$b" "$6") | **$(ratio "$a" "$b")** |"
}

compare() { # chat-relay's figures as ratios to the reference's, same run
  [ -n "${result[s1]:-}" ] || return 0
  echo "| Figure | Better | chat-relay | reference | chat-relay ÷ reference |"
  echo "|---|:-:|--:|--:|--:|"
  local sc r f up
  for sc in s1 s2; do
    r="${result[$sc]:-}" f="${result[${sc}r]:-}" up="${sc^^}"
    compare_row "$up deliveries/s" higher deliveries_per_sec "$r" "$f" 0
    compare_row "$up relay CPU µs / delivery" lower relay_cpu_us_per_delivery "$r" "$f" 2
    compare_row "$up latency p50 (ms)" lower lat_p50_ms "$r" "$f" 1
    compare_row "$up latency p99 (ms)" lower lat_p99_ms "$r" "$f" 1
    compare_row "$up Redis CPU µs / stored message" lower redis_cpu_us_per_stored "$r" "$f" 1
  done
  compare_row "S3 relay KiB / idle connection" lower relay_kib_per_conn "${result[s3]:-}" "${result[s3r]:-}" 2
  if [ -n "${result[s3big]:-}" ]; then
    compare_row "S3 --big relay KiB / idle connection" lower relay_kib_per_conn "${result[s3big]}" "${result[s3bigr]:-}" 2
  fi
  if [ -n "${result[s4]:-}" ]; then
    echo "| S4 LLM deltas/s | higher | $(num "$(jget "${result[s4]}" deltas_per_sec)") | (no LLM) | - |"
  fi
  if [ "$reference" -eq 0 ]; then
    echo
    echo "(No reference relay in this run: ratios are \"-\".)"
  fi
}

# --- run ------------------------------------------------------------------------------------

if [ "$build" -eq 1 ]; then
  if [ "$profile" = release ]; then
    say "cargo build --release --workspace --bins"
    cargo build --release --workspace --bins --quiet
  else
    say "cargo build --workspace --bins (debug: the short form checks correctness, not speed)"
    cargo build --workspace --bins --quiet
  fi
  if [ "$reference" -eq 1 ]; then
    say "cargo build --release --manifest-path $ref_dir/Cargo.toml --target-dir target/reference-relay"
    cargo build --release --quiet --manifest-path "$ref_dir/Cargo.toml" --target-dir target/reference-relay
  fi
fi
if [ "$reference" -eq 1 ] && [ ! -x "$ref_bin" ]; then
  say "$ref_bin not found (build it, or run without --no-build): absolute figures only"
  reference=0
fi
command -v redis-server >/dev/null || { say "redis-server missing: run scripts/setup.sh"; exit 1; }
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"

start_redis
start_relay main

if [ "$short" -eq 1 ]; then
  run_scenario s1 relay "S1 short: 5 rooms × 3 clients × 50 msgs" \
    --rooms 5 --clients 3 --messages 50 --size 256 --window 32 --timeout 30
  run_scenario s2 relay "S2 short: 1 room × 20 clients, 5 senders, 200 msg/s × 2 s" \
    --rooms 1 --clients 20 --senders 5 --rate 200 --duration 2 --timeout 30
  table
  if [ "$failed" -ne 0 ]; then say "FAILED"; exit 1; fi
  say "passed"
  exit 0
fi

# Each scenario runs on chat-relay, then on the reference, back to back, so both see the same
# machine; the idle server waits meanwhile (it costs nothing).
if [ "$reference" -eq 1 ]; then start_reference main; fi
s1_args=(--rooms 50 --clients 4 --messages 200 --size 256 --window 32 --timeout 60)
s2_args=(--rooms 1 --clients 200 --senders 20 --rate 2000 --duration 10 --window 32 --timeout 60)
s1_label="S1 many rooms: 50 × 4 clients, 200 msgs × 256 B, window 32"
s2_label="S2 big room: 1 × 200 clients, 20 senders, 2,000 msg/s × 10 s"
if [ "$perf" -eq 1 ]; then
  # Flat profile (no -g: release builds have no frame pointers, so -g stacks would be garbage).
  perf record -F 999 -e cpu-clock -p "$relay_pid" -o "$logs/perf-s1.data" >"$logs/perf.log" 2>&1 &
  perf_pid=$!
  sleep 0.5
fi
run_scenario s1 relay "$s1_label" "${s1_args[@]}"
if [ "$perf" -eq 1 ]; then
  stop_pid "$perf_pid" INT; perf_pid=""
  perf report -i "$logs/perf-s1.data" --no-children --percent-limit 1 --stdio --sort dso,symbol \
    2>/dev/null | grep -E '^ +[0-9.]+%' | sed 's/[ -]*$//; s/ \{3,\}/  /g' | head -30 >"$logs/perf-s1.txt" || true
fi
if [ "$reference" -eq 1 ]; then run_scenario s1r reference "$s1_label" "${s1_args[@]}"; fi
run_scenario s2 relay "$s2_label" "${s2_args[@]}"
if [ "$reference" -eq 1 ]; then run_scenario s2r reference "$s2_label" "${s2_args[@]}"; fi

# Fresh servers, so the idle figure is not flattered by memory freed after S1/S2.
stop_relay
if [ "$reference" -eq 1 ]; then stop_reference; fi
start_relay idle
idle_scenario s3 relay "S3 idle: 5,000 connections" --connections 5000
stop_relay
if [ "$reference" -eq 1 ]; then
  start_reference idle
  idle_scenario s3r reference "S3 idle: 5,000 connections" --connections 5000
  stop_reference
fi
if [ "$big" -eq 1 ]; then
  big_n=$(( nofile - 300 < 20000 ? nofile - 300 : 20000 ))
  big_label="S3 idle --big: $(num "$big_n") connections, 4 source addresses"
  big_args=(--connections "$big_n" --sources 127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4)
  start_relay idle-big
  idle_scenario s3big relay "$big_label" "${big_args[@]}"
  stop_relay
  if [ "$reference" -eq 1 ]; then
    start_reference idle-big
    idle_scenario s3bigr reference "$big_label" "${big_args[@]}"
    stop_reference
  fi
fi

# S4: the LLM participant on, against a fast fake OpenAI-compatible server (the `fake-llm` tool),
# with its own key prefix so the worker does not first read the rooms of S1-S3.
llm_port="$(free_port)"
"$bins/fake-llm" --port "$llm_port" --delay-ms 2 --tokens 100 >"$logs/fake-llm.log" 2>&1 &
fake_llm_pid=$!
saved_flags=("${relay_flags[@]}")
relay_flags=(
  --msgs-per-sec 1000000 --msgs-burst 1000000
  --room-msgs-per-sec 1000000 --room-msgs-burst 1000000
  --max-conns-per-ip 100000 --max-conns-per-room 100000
  --max-tcp-conns-per-ip 100000 --handshakes-per-sec 1000000 --handshakes-burst 1000000
  --room-creations-per-sec 1000000 --room-creations-burst 1000000
  --outbound-queue 4096 --shutdown-grace-secs 2
  --key-prefix bench4:session: --llm-base-url "http://127.0.0.1:$llm_port/v1"
  --llm-turns-per-minute 100000 --llm-concurrency 16 --llm-max-tokens 200
)
start_relay llm
llm_scenario s4 "S4 LLM fan-out: 1 room × 100 clients, 10 concurrent turns × 100 tokens" \
  --clients 100 --turns 10 --timeout 90
stop_relay
stop_pid "$fake_llm_pid"
relay_flags=("${saved_flags[@]}")

table
echo
compare

# --- report ---------------------------------------------------------------------------------

[ -n "$out" ] || exit "$failed"

s1="${result[s1]:-}" s2="${result[s2]:-}" s3="${result[s3]:-}"
s1r="${result[s1r]:-}" s2r="${result[s2r]:-}" s3r="${result[s3r]:-}"
verdict() { # ACTUAL OP TARGET → how far from the target, in the target's own direction
  awk -v a="$1" -v op="$2" -v t="$3" 'BEGIN {
    if (a == "" || a == "null") { print "no figure"; exit }
    if (op == ">=") {
      if (a >= t) printf "met (%.2f× the target)", a / t
      else printf "**not met**: %.2f× the target, needs %.1f× more", a / t, t / a
    } else {
      if (a <= t) printf "met (%.2f× the limit)", a / t
      else printf "**not met**: %.1f× the limit", a / t
    }
  }'
}

rnum() { # A B → A ÷ B as a plain number (empty when either is missing)
  awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && a != "null" && b != "" && b != "null" && b + 0 != 0) print a / b }'
}
# Redis CPU per stored message in S1 before issue 16's work (measured at commit 0c1e0ba: 16.5 µs,
# the append script's cost), for its "1/3 of today's" target.
redis_baseline_us="${BENCH_REDIS_BASELINE_US:-16.5}"

cpu_model="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
mem_gib="$(awk '/MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff-index --quiet HEAD -- 2>/dev/null || commit="$commit (with uncommitted changes)"
notes_begin='<!-- notes:begin -->' notes_end='<!-- notes:end -->'
notes=""
if [ -f "$out" ]; then
  notes="$(sed -n "/^$notes_begin\$/,/^$notes_end\$/p" "$out" | sed '1d;$d')"
fi

{
  echo "# Benchmarks"
  echo
  echo "Generated by \`scripts/bench.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit."
  echo "Load generator: \`cargo run --release -p chat-relay-tools --bin loadgen -- run|idle|llm ...\`"
  echo "(tools/src/bin/loadgen/). Reference: \`reference-relay --xadd\` (the lean baseline in"
  echo "\`shared/reference-relay/\`), run beside chat-relay in the same invocation on the same Redis and"
  echo "load generator; every figure is also given as a ratio to it."
  echo
  echo "## Machine"
  echo
  echo "- CPU: $cpu_model, $(nproc) cores (\`nproc\`)"
  echo "- Memory: $mem_gib GiB; kernel $(uname -r)"
  echo "- $(redis-server --version | cut -d' ' -f1-3) (no persistence: \`--save '' --appendonly no\`); $(rustc --version)"
  echo "- Relay, Redis and loadgen all share this machine over loopback; load average before the run: $load_before."
  echo "  Other builds and tests may have been running at the same time, so figures are noisy and"
  echo "  loadgen itself competes with the relay and Redis for the same cores (see the \"Loadgen\" and"
  echo "  \"Other processes\" columns)."
  echo "- Relay flags: \`${relay_flags[*]}\`; open-file limit $nofile."
  if [ "$reference" -eq 1 ]; then
    echo "- Reference: \`reference-relay --xadd\` from $ref_dir (XADD each message, 32 in flight per socket,"
    echo "  broadcast in memory; no ack, no dedup, no resume), built with the same rustc."
  else
    echo "- Reference: not run (not found, or --no-reference): no ratios."
  fi
  echo
  echo "## Results"
  echo
  table
  echo
  echo "### chat-relay as a ratio to the reference (same run)"
  echo
  compare
  echo
  echo "Deliveries = chat messages received by clients (every member, sender included). Latency = receive"
  echo "time − \`bd.t\` (send time), over all deliveries. Relay CPU = utime+stime of the relay process"
  echo "from the start barrier to the last delivery, so µs/delivery charges the relay's whole cost"
  echo "(parsing, Redis round trips, acks, fan-out) to deliveries; µs/message divides the same by messages"
  echo "sent. Cores = CPU seconds / wall seconds of that window. \"Other processes\" = the machine's busy"
  echo "CPU (\`/proc/stat\`) minus loadgen, relay and Redis: work that was not ours, competing for the"
  echo "same $(nproc) cores. Redis CPU µs / stored message = Redis CPU over the window ÷ messages stored"
  echo "(acked; for the reference, its messages, each XADDed once). For the reference, \"Relay\" columns"
  echo "describe the reference process; a message counts as answered when its sender receives its copy."
  echo "S4 runs the relay's LLM participant against a fast fake OpenAI-compatible"
  echo "server (\`fake-llm\`: 100 tokens, 2 ms apart); delta latency is from the delta's \`hd.ts\`"
  echo "(the relay's clock when it published it) to its arrival at each member."
  echo
  echo "## Targets"
  echo
  echo "Issue 16's targets: ratios are to the reference measured in this run."
  echo
  echo "| Target | Measured | Verdict |"
  echo "|---|--:|---|"
  echo "| S1 deliveries/s ≥ 1.0× the reference (stretch 1.5×) | $(num "$(jget "$s1" deliveries_per_sec)") vs $(num "$(jget "$s1r" deliveries_per_sec)") = $(ratio "$(jget "$s1" deliveries_per_sec)" "$(jget "$s1r" deliveries_per_sec)") | $(verdict "$(rnum "$(jget "$s1" deliveries_per_sec)" "$(jget "$s1r" deliveries_per_sec)")" '>=' 1) |"
  echo "| S1 zero loss, duplicates, reordering | $(jget "$s1" loss) lost, $(jget "$s1" duplicates) dup, $(jget "$s1" reorders) reordered | $( [ "$(jget "$s1" passed)" = true ] && echo met || echo '**not met**') |"
  echo "| S1 relay CPU ≤ 4 µs per delivery | $(dec "$(jget "$s1" relay_cpu_us_per_delivery)" 2) µs | $(verdict "$(jget "$s1" relay_cpu_us_per_delivery)" '<=' 4) |"
  echo "| S1 relay CPU per delivery ≤ the reference's | $(dec "$(jget "$s1" relay_cpu_us_per_delivery)" 2) vs $(dec "$(jget "$s1r" relay_cpu_us_per_delivery)" 2) µs = $(ratio "$(jget "$s1" relay_cpu_us_per_delivery)" "$(jget "$s1r" relay_cpu_us_per_delivery)") | $(verdict "$(rnum "$(jget "$s1" relay_cpu_us_per_delivery)" "$(jget "$s1r" relay_cpu_us_per_delivery)")" '<=' 1) |"
  echo "| S2 400,000 deliveries/s offered, kept up (senders reach ≥ 98 % of 2,000 msg/s) | $(num "$(jget "$s2" deliveries_per_sec)") deliveries/s, senders at $(num "$(jget "$s2" sent_per_sec)") msg/s, p99 $(dec "$(jget "$s2" lat_p99_ms)" 1) ms | $(verdict "$(jget "$s2" sent_per_sec)" '>=' 1960) |"
  echo "| S2 relay CPU per delivery ≤ the reference's | $(dec "$(jget "$s2" relay_cpu_us_per_delivery)" 2) vs $(dec "$(jget "$s2r" relay_cpu_us_per_delivery)" 2) µs = $(ratio "$(jget "$s2" relay_cpu_us_per_delivery)" "$(jget "$s2r" relay_cpu_us_per_delivery)") | $(verdict "$(rnum "$(jget "$s2" relay_cpu_us_per_delivery)" "$(jget "$s2r" relay_cpu_us_per_delivery)")" '<=' 1) |"
  echo "| S3 ≤ 10 KiB per idle connection | $(dec "$(jget "$s3" relay_kib_per_conn)" 2) KiB (reference $(dec "$(jget "$s3r" relay_kib_per_conn)" 2)) | $(verdict "$(jget "$s3" relay_kib_per_conn)" '<=' 10) |"
  if [ -n "${result[s3big]:-}" ]; then
    s3big="${result[s3big]}" s3bigr="${result[s3bigr]:-}"
    echo "| S3 ≤ 10 KiB per idle connection at 20,000 connections (\`--big\`: $(num "$(jget "$s3big" connections)")) | $(dec "$(jget "$s3big" relay_kib_per_conn)" 2) KiB (reference $(dec "$(jget "$s3bigr" relay_kib_per_conn)" 2)) | $(verdict "$(jget "$s3big" relay_kib_per_conn)" '<=' 10) |"
  fi
  echo "| S4 LLM fan-out: no regression | $(num "$(jget "${result[s4]:-}" deltas_per_sec)") deltas/s, p99 $(dec "$(jget "${result[s4]:-}" lat_p99_ms)" 1) ms | compare with earlier runs (no reference: it has no LLM) |"
  echo "| S1 Redis CPU per stored message ≤ 1/3 of $redis_baseline_us µs (before issue 16) | $(dec "$(jget "$s1" redis_cpu_us_per_stored)" 1) µs (reference $(dec "$(jget "$s1r" redis_cpu_us_per_stored)" 1)) | $(verdict "$(jget "$s1" redis_cpu_us_per_stored)" '<=' "$(awk -v b="$redis_baseline_us" 'BEGIN { print b / 3 }')") |"
  if [ -s "$logs/perf-s1.txt" ]; then
    echo
    echo "## Relay profile under S1 (\`perf record -e cpu-clock\`, flat self time, symbols ≥ 1 %)"
    echo
    echo '```text'
    cat "$logs/perf-s1.txt"
    echo '```'
  fi
  echo
  echo "## Notes"
  echo
  echo "$notes_begin"
  if [ -n "$notes" ]; then echo "$notes"; else echo "(analysis goes here; kept when the file is regenerated)"; fi
  echo "$notes_end"
} >"$out.tmp"
mv "$out.tmp" "$out"
say "wrote $out"
exit "$failed"
