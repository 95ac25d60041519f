#!/usr/bin/env bash
# Capacity run: what one relay core, one Redis shard and one idle connection are worth, on three
# configurations measured in one invocation, each on its own servers (free loopback ports,
# started here and stopped by PID):
#   one      1 relay node on 1 Redis
#   two      2 relay nodes on 1 Redis (live fan-out crosses nodes through Redis pub/sub)
#   cluster  2 relay nodes on a local 3-master Redis Cluster (scripts/cluster.sh; --redis-cluster)
# and three scenarios, with the load generator (tools/src/bin/loadgen/) spreading each room's
# clients over the nodes round-robin, so every room has members on every node:
#   fan-out  closed loop, like bench S1: 50 rooms x 4 clients, 200 msgs x 256 B each, window 32
#   rate     open loop, like bench S2 on 4 rooms: 4 x 50 clients, 5 senders each, 2,000 msg/s for 10 s
#   idle     4,000 idle connections per node on fresh relays: KiB per connection, then 20 s of
#            steady state (presence heartbeats, pings): CPU per connection, Redis bytes per connection
# All configurations are up at once and the traffic scenarios run in interleaved rounds (fan-out
# on each, then rate on each, 3 times), so a noisy shared machine disturbs every configuration
# alike; figures are medians over the rounds. Idle runs last, one configuration at a time.
#
#   scripts/capacity.sh                 full run (release builds, ~6 minutes): Markdown on stdout
#   scripts/capacity.sh --short         smoke (debug builds unless CAPACITY_PROFILE=release, one
#                                       round, tiny scenarios): fails only on loss, duplicates,
#                                       reordering, errors or failed connections, never on speed
#   options:
#     --configs LIST   which configurations, comma-separated (default one,two,cluster)
#     --rounds N       traffic rounds (default 3; --short 1)
#     --idle N         idle connections per relay node (default 4000; capped by `ulimit -n`)
#     --out FILE       also write the report to FILE
#     --no-build       use the existing binaries
#     --keep-logs      keep the servers' and loadgen's logs (otherwise kept only on failure)
#
# Relays run with the LLM off and abuse limits lifted as in scripts/bench.sh. Both Redis set-ups
# run without persistence (the cluster's masters get `CONFIG SET appendonly no`), so single Redis
# and cluster differ only in sharding. Everything shares this machine's cores: per-core figures
# are derived from measured CPU time (/proc/PID/stat), never from wall time.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[capacity] %s\n' "$*" >&2; }

short=0 build=1 keep_logs=0 out="" configs="one,two,cluster" idle_per_node=4000 rounds=""
while [ $# -gt 0 ]; do
  case "$1" in
    --short) short=1 ;;
    --no-build) build=0 ;;
    --keep-logs) keep_logs=1 ;;
    --configs) configs="${2:?--configs needs a list}"; shift ;;
    --idle) idle_per_node="${2:?--idle needs a number}"; shift ;;
    --rounds) rounds="${2:?--rounds needs a number}"; shift ;;
    --out) out="${2:?--out needs a file}"; shift ;;
    -h|--help) sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) say "unknown option: $1"; exit 2 ;;
  esac
  shift
done
for c in ${configs//,/ }; do
  case "$c" in one|two|cluster) ;; *) say "unknown configuration: $c (one, two, cluster)"; exit 2 ;; esac
done
profile=release
if [ "$short" -eq 1 ] && [ "${CAPACITY_PROFILE:-}" != release ]; then profile=debug; fi

if [ "$short" -eq 1 ]; then
  fanout_args=(--rooms 10 --clients 4 --messages 20 --size 256 --window 8 --timeout 30)
  rate_args=(--rooms 2 --clients 10 --senders 2 --rate 200 --duration 2 --window 32 --timeout 30)
  idle_per_node=100 steady=0 settle=0.5 rounds="${rounds:-1}"
else
  fanout_args=(--rooms 50 --clients 4 --messages 200 --size 256 --window 32 --timeout 90)
  rate_args=(--rooms 4 --clients 50 --senders 5 --rate 2000 --duration 10 --window 32 --timeout 90)
  steady=20 settle=2 rounds="${rounds:-3}"
fi
fanout_label="fan-out: $(printf '%s ' "${fanout_args[@]}" | sed 's/ --timeout [0-9]*//; s/ $//')"
rate_label="rate: $(printf '%s ' "${rate_args[@]}" | sed 's/ --timeout [0-9]*//; s/ $//')"

if [ "$build" -eq 1 ]; then
  say "building ($profile)"
  flag=(); [ "$profile" = release ] && flag=(--release)
  cargo build --quiet "${flag[@]}" --workspace --bins
fi
relay_bin="${CARGO_TARGET_DIR:-target}/$profile/chat-relay"
loadgen_bin="${CARGO_TARGET_DIR:-target}/$profile/loadgen"

# --- processes and cleanup ------------------------------------------------------------------

logs="$(mktemp -d "${TMPDIR:-/tmp}/chat-relay-capacity.XXXXXX")"
loadgen_pid="" failed=0
# Per configuration: its Redis processes and how relays reach them, its relay nodes.
declare -A redis_ports redis_pids redis_args relay_pids relay_urls
cluster_dir="" single_pids=""

stop_pid() { # PID: stop one process we started and wait for it
  local pid="$1"
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -s KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

stop_relays() { # CONFIG
  local pid
  for pid in ${relay_pids[$1]:-}; do stop_pid "$pid"; done
  relay_pids[$1]="" relay_urls[$1]=""
}

stop_backends() {
  local pid
  for pid in $single_pids; do stop_pid "$pid"; done
  single_pids=""
  if [ -n "$cluster_dir" ]; then
    scripts/cluster.sh stop "$cluster_dir" 2>/dev/null || true
    cluster_dir=""
  fi
}

cleanup() {
  stop_pid "$loadgen_pid"
  local c
  for c in "${!relay_pids[@]}"; do stop_relays "$c"; done
  stop_backends
  if [ "$keep_logs" -eq 1 ] || [ "$failed" -ne 0 ]; then
    say "logs kept in $logs"
  else
    rm -rf "$logs"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile="$(ulimit -n)"
max_idle=$(( (nofile - 500) / 2 ))
if [ "$idle_per_node" -gt "$max_idle" ]; then
  say "--idle $idle_per_node per node needs more open files than $nofile for 2 nodes: using $max_idle"
  idle_per_node="$max_idle"
fi

free_port() { # a loopback TCP port nothing listens on, below the ephemeral range loadgen uses
  local port
  for _ in $(seq 50); do
    port=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return 0; fi
  done
  say "no free port found"; return 1
}

# --- servers --------------------------------------------------------------------------------

start_backend() { # CONFIG: its own Redis, or the 3-master cluster
  if [ "$1" = cluster ]; then
    cluster_dir="$logs/cluster"
    local seeds hp ports="" pids=""
    seeds="$(scripts/cluster.sh start "$cluster_dir" 2>>"$logs/cluster.log")" \
      || { say "cluster did not start (see $logs/cluster.log)"; failed=1; exit 1; }
    for hp in ${seeds//,/ }; do
      ports+="${hp##*:} " pids+="$(cat "$cluster_dir/${hp##*:}/redis.pid") "
      redis-cli -p "${hp##*:}" config set appendonly no >/dev/null
    done
    redis_ports[$1]="$ports" redis_pids[$1]="$pids" redis_args[$1]="--redis-cluster $seeds"
  else
    local port pid
    port="$(free_port)"
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
      --dir "$logs" --logfile "$logs/redis-$1.log" &
    pid=$!
    single_pids+="$pid "
    for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    redis_ports[$1]="$port" redis_pids[$1]="$pid" redis_args[$1]="--redis-url redis://127.0.0.1:$port"
  fi
}

# Every limit lifted, as in scripts/bench.sh: this measures the relay's path, not its abuse limits.
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

nodes_of() { case "$1" in one) echo 1 ;; *) echo 2 ;; esac; }

start_relays() { # CONFIG NAME: fresh relay nodes for CONFIG on its backend
  local c="$1" name="$2" i port pid
  for i in $(seq "$(nodes_of "$c")"); do
    port="$(free_port)"
    # shellcheck disable=SC2086  # redis_args is a flag and its value
    RELAY_LOG="${RELAY_LOG:-chat_relay=warn}" "$relay_bin" serve --listen "127.0.0.1:$port" \
      ${redis_args[$c]} "${relay_flags[@]}" >"$logs/relay-$name-$i.log" 2>&1 &
    pid=$!
    relay_pids[$c]+="$pid " relay_urls[$c]+="ws://127.0.0.1:$port "
    for _ in $(seq 300); do
      curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if ! curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
      say "relay $name-$i did not become ready:"; tail -20 "$logs/relay-$name-$i.log" >&2; failed=1; exit 1
    fi
  done
}

csv() { local v; v="$(echo $1)"; echo "${v// /,}"; } # "a b " → "a,b"

redis_sum() { # CONFIG FIELD: the sum of an INFO field (e.g. used_memory) over the config's Redis
  local port total=0 v
  for port in ${redis_ports[$1]}; do
    v="$(redis-cli -p "$port" info all | tr -d '\r' | sed -n "s/^$2:\([0-9]*\).*/\1/p")"
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

xadd_each() { # CONFIG: XADD calls so far on each of its Redis (commands run by scripts included)
  local port v
  for port in ${redis_ports[$1]}; do
    v="$(redis-cli -p "$port" info commandstats | tr -d '\r' | sed -n 's/^cmdstat_xadd:calls=\([0-9]*\),.*/\1/p')"
    echo "${v:-0}"
  done | paste -sd' '
}

# --- scenarios ------------------------------------------------------------------------------

# result[CONFIG.SCENARIO]: loadgen's JSON lines, one per round. shard_xadds[CONFIG.SCENARIO]:
# XADDs per Redis process, summed over the rounds.
declare -A result shard_xadds

run_scenario() { # CONFIG SCENARIO ROUND loadgen-run-args...
  local c="$1" sc="$2" round="$3"; shift 3
  local name="$c.$sc.$round" rc=0 line x0 x1
  x0="$(xadd_each "$c")"
  say "round $round: $sc on $(config_label "$c")"
  timeout 150 "$loadgen_bin" run --url "$(csv "${relay_urls[$c]}")" \
    --relay-pid "$(csv "${relay_pids[$c]}")" --redis-pid "$(csv "${redis_pids[$c]}")" \
    --json "$@" >"$logs/$name.json" 2>"$logs/$name.err" || rc=$?
  x1="$(xadd_each "$c")"
  line="$(tail -1 "$logs/$name.json")"
  if [ "$rc" -ne 0 ] || ! jq -e . >/dev/null 2>&1 <<<"$line"; then
    failed=1
    say "$name FAILED (exit $rc): $(tail -3 "$logs/$name.err" | tr '\n' ' ')"
    return 0
  fi
  if [ "$(jq -r '.passed and .errors_total == 0' <<<"$line")" != true ]; then
    failed=1
    say "$name FAILED: $(jq -c '{loss,duplicates,reorders,errors_text,connect_failures,dropped}' <<<"$line")"
  fi
  result[$c.$sc]+="$line"$'\n'
  shard_xadds[$c.$sc]="$(awk -v a="$x0" -v b="$x1" -v sum="${shard_xadds[$c.$sc]:-}" 'BEGIN {
    n = split(a, x, " "); split(b, y, " "); split(sum, s, " ")
    for (i = 1; i <= n; i++) printf "%s%d", (i > 1 ? " " : ""), s[i] + y[i] - x[i]
  }')"
}

idle_scenario() { # CONFIG CONNECTIONS: idle connections on its relays; Redis memory while held
  local c="$1" conns="$2" name="$1.idle" rc=0 line mem0 mem1=""
  mem0="$(redis_sum "$c" used_memory)"
  say "idle: $conns connections on $(config_label "$c")"
  # Not --json: the human "idle:" line tells when the measurement is done and the connections
  # are held (--hold), so Redis' memory can be read with every connection present.
  timeout 300 "$loadgen_bin" idle --url "$(csv "${relay_urls[$c]}")" \
    --relay-pid "$(csv "${relay_pids[$c]}")" --redis-pid "$(csv "${redis_pids[$c]}")" \
    --connections "$conns" --settle "$settle" --steady "$steady" --hold 3 --timeout 120 \
    >"$logs/$name.out" 2>"$logs/$name.err" &
  loadgen_pid=$!
  while kill -0 "$loadgen_pid" 2>/dev/null; do
    if grep -qs '^idle:' "$logs/$name.out"; then mem1="$(redis_sum "$c" used_memory)"; break; fi
    sleep 0.2
  done
  wait "$loadgen_pid" || rc=$?
  loadgen_pid=""
  line="$(tail -1 "$logs/$name.out")"
  if [ "$rc" -ne 0 ] || ! jq -e . >/dev/null 2>&1 <<<"$line"; then
    failed=1
    say "$name FAILED (exit $rc): $(tail -3 "$logs/$name.err" | tr '\n' ' ')"
    return 0
  fi
  if [ -n "$mem1" ]; then
    line="$(jq -c --argjson a "$mem0" --argjson b "$mem1" \
      '. + {redis_used_memory_before: $a, redis_used_memory_held: $b,
            redis_bytes_per_conn: (if (.ready // 0) > 0 then (($b - $a) / .ready | floor) else null end)}' <<<"$line")"
  fi
  result[$name]="$line"
}

config_label() {
  case "$1" in
    one) echo "(a) 1 relay node, 1 Redis" ;;
    two) echo "(b) 2 relay nodes, 1 Redis" ;;
    cluster) echo "(c) 2 relay nodes, 3-master Redis Cluster" ;;
  esac
}

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
started_at="$(date -u '+%Y-%m-%d %H:%M UTC')"
for c in ${configs//,/ }; do
  start_backend "$c"
  start_relays "$c" "$c"
done
for round in $(seq "$rounds"); do
  for c in ${configs//,/ }; do run_scenario "$c" fanout "$round" "${fanout_args[@]}"; done
  for c in ${configs//,/ }; do run_scenario "$c" rate "$round" "${rate_args[@]}"; done
done
# Fresh relays, one configuration at a time, so the idle figure is not flattered by memory the
# runs above freed, and the steady-state CPU is that configuration's alone.
for c in ${configs//,/ }; do stop_relays "$c"; done
for c in ${configs//,/ }; do
  start_relays "$c" "$c-idle"
  idle_scenario "$c" $((idle_per_node * $(nodes_of "$c")))
  stop_relays "$c"
done
stop_backends
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

# --- report ---------------------------------------------------------------------------------

raw() { # CONFIG.SCENARIO JQ-EXPR: the median over the rounds, as jq prints it; empty when missing
  jq -rs "[.[] | ($2)] | map(select(. != null)) | sort
          | if length == 0 then empty else .[(length - 1) / 2 | floor] end" \
    <<<"${result[$1]:-}" 2>/dev/null || true
}

total_of() { # CONFIG.SCENARIO JQ-EXPR: the sum over the rounds
  jq -rs "[.[] | ($2)] | add // empty" <<<"${result[$1]:-}" 2>/dev/null || true
}

spread() { # CONFIG.SCENARIO JQ-EXPR: " (min–max)" over the rounds, when there are several
  [ "$rounds" -gt 1 ] || return 0
  jq -rs "[.[] | ($2)] | map(select(. != null)) | if length < 2 then empty
          else \" (\\(min | round)–\\(max | round))\" end" <<<"${result[$1]:-}" 2>/dev/null \
    | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta' || true
}

fig() { # CONFIG.SCENARIO JQ-EXPR [DIGITS]: one figure, formatted (integers with separators); "-" when missing
  local v
  v="$(raw "$1" "$2")"
  [ -n "$v" ] && [ "$v" != null ] || { echo "-"; return; }
  if [ "${3:-0}" -eq 0 ]; then
    awk -v x="$v" 'BEGIN { printf "%.0f", x }' | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta'
  else
    awk -v x="$v" -v d="$3" 'BEGIN { printf "%.*f", d, x }'
  fi
}

per_node() { # CONFIG.SCENARIO JQ-FIELD DIGITS: "a / b" over the relay nodes (medians over the rounds)
  local s="${result[$1]:-}"
  [ -n "$s" ] || { echo "-"; return; }
  jq -rs --arg f "$2" '[.[] | [.relay_nodes[]? | .[$f]]] | transpose
      | map(map(select(. != null)) | sort | if length == 0 then null else .[(length - 1) / 2 | floor] end)
      | map(tostring) | join(" ")' <<<"$s" 2>/dev/null \
    | awk -v d="$3" '{
        for (i = 1; i <= NF; i++) printf "%s%s", (i > 1 ? " / " : ""), ($i == "null" ? "-" : sprintf("%.*f", d, $i))
      }'
}

shards_of() { case "$1" in cluster) echo 3 ;; *) echo 1 ;; esac; }

report() {
  echo "## Capacity run"
  echo
  echo "\`scripts/capacity.sh$( [ "$short" -eq 1 ] && echo ' --short')\` on $started_at, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff-index --quiet HEAD -- 2>/dev/null || echo ' (with uncommitted changes)'), $profile build."
  echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), load average $load_before before, $load_after after."
  echo "**Every process shares these $(nproc) cores**: the relay nodes, Redis (1 or 3 processes) and"
  echo "the load generator itself. Throughput and latency are what this machine gives with all of them"
  echo "on it; per-core figures are derived from each process's measured CPU time (/proc/PID/stat),"
  echo "not from wall time, so they say what one core of each kind is worth."
  echo
  echo "Scenarios: $fanout_label (closed loop); $rate_label (open loop); $rounds round(s), interleaved"
  echo "across the configurations (all up at once), figures are medians over the rounds (min–max in brackets);"
  echo "idle: $idle_per_node connections per node over 100 rooms, RSS after ${settle} s, then ${steady} s of steady state."
  echo "Clients of each room are spread over the nodes round-robin, so with 2 nodes every room has"
  echo "members on both and every message crosses nodes through Redis pub/sub."
  echo
  local c sc
  echo "| Configuration | Scenario | Deliveries/s | Appends/s | Fan-out (deliveries / append) | Relay CPU µs / delivery (total; per node) | Relay cores (per node) | Deliveries/s per relay core | Redis shards | Appends/s per shard | Redis CPU µs / append | Appends/s per Redis core | p50 / p99 (ms) | Loadgen cores | Others' cores | Loss / dup / reorder |"
  echo "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|"
  for c in ${configs//,/ }; do
    for sc in fanout rate; do
      local k="$c.$sc" shards
      shards="$(shards_of "$c")"
      echo "| $(config_label "$c") | $sc | **$(fig "$k" .deliveries_per_sec)** | $(fig "$k" .appends_per_sec)" \
        "| $(fig "$k" .deliveries_per_append 1) | **$(fig "$k" .relay_cpu_us_per_delivery 2)** ($(per_node "$k" cpu_us_per_delivery 2))" \
        "| $(fig "$k" .relay_cpu_cores 2) ($(per_node "$k" cpu_cores 2)) | **$(fig "$k" .deliveries_per_relay_cpu_sec)**$(spread "$k" .deliveries_per_relay_cpu_sec)" \
        "| $shards | $(fig "$k" ".appends_per_sec / $shards") | $(fig "$k" .redis_cpu_us_per_stored 1)" \
        "| **$(fig "$k" .appends_per_redis_cpu_sec)**$(spread "$k" .appends_per_redis_cpu_sec) | $(fig "$k" .lat_p50_ms 1) / $(fig "$k" .lat_p99_ms 1)" \
        "| $(fig "$k" .loadgen_cpu_cores 2) | $(fig "$k" .others_cpu_cores 2)" \
        "| $(fig "$k" .loss) / $(fig "$k" .duplicates) / $(fig "$k" .reorders) |"
    done
  done
  echo
  echo "| Configuration | Idle connections (ready / asked) | Connects/s | Relay KiB / connection (total; per node) | Relay CPU µs / connect | Relay µs CPU / connection-second (steady) | Redis µs CPU / connection-second (steady) | Redis bytes / connection (presence + join entries) |"
  echo "|---|--:|--:|--:|--:|--:|--:|--:|"
  for c in ${configs//,/ }; do
    local k="$c.idle"
    echo "| $(config_label "$c") | $(fig "$k" .ready) / $(fig "$k" .connections) | $(fig "$k" .connects_per_sec)" \
      "| **$(fig "$k" .relay_kib_per_conn 2)** ($(per_node "$k" kib_per_conn 2))" \
      "| $(fig "$k" 'if (.ready // 0) > 0 and .relay_cpu_connect_secs != null then .relay_cpu_connect_secs * 1e6 / .ready else null end')" \
      "| $(fig "$k" .relay_steady_us_per_conn_sec 2)" \
      "| $(fig "$k" .redis_steady_us_per_conn_sec 2) | $(fig "$k" .redis_bytes_per_conn) |"
  done
  if [[ ",$configs," == *,cluster,* ]]; then
    echo
    echo "XADDs per cluster master (appends plus join entries, all rounds): fan-out $(sed 's/ / \/ /g' <<<"${shard_xadds[cluster.fanout]:-}"), rate $(sed 's/ / \/ /g' <<<"${shard_xadds[cluster.rate]:-}")."
  fi
  echo
  echo "Relay CPU per delivery charges each node's whole cost (parse, append, ack, pub/sub, fan-out)"
  echo "to the deliveries its own clients received; \"per relay core\" = deliveries ÷ relay CPU seconds;"
  echo "\"per Redis core\" = appends ÷ Redis CPU seconds (all masters); appends/s per shard = appends/s ÷"
  echo "masters, the load each master carried here (rooms hash unevenly over 3 masters: see the XADDs)."
  comparison
  cost_model
}

ratio_row() { # LABEL BETTER KEY-A KEY-B JQ DIGITS
  local a b
  a="$(raw "$3" "$5")" b="$(raw "$4" "$5")"
  awk -v l="$1" -v better="$2" -v a="$a" -v b="$b" -v d="$6" 'BEGIN {
    if (a == "" || b == "" || b + 0 == 0) { printf "| %s | %s | - | - | - |\n", l, better; exit }
    printf "| %s | %s | %.*f | %.*f | **%.2f×** |\n", l, better, d, a, d, b, a / b
  }'
}

comparison() {
  local pairs=()
  [[ ",$configs," == *,one,* && ",$configs," == *,two,* ]] && pairs+=("two one 2 nodes vs 1 node (1 Redis)")
  [[ ",$configs," == *,two,* && ",$configs," == *,cluster,* ]] && pairs+=("cluster two cluster vs single Redis (2 nodes)")
  [ "${#pairs[@]}" -gt 0 ] || return 0
  local p a b label
  for p in "${pairs[@]}"; do
    read -r a b label <<<"$p"
    echo
    echo "### $label"
    echo
    echo "| Figure | Better | $(config_label "$a") | $(config_label "$b") | Ratio |"
    echo "|---|:-:|--:|--:|--:|"
    ratio_row "fan-out deliveries/s" higher "$a.fanout" "$b.fanout" .deliveries_per_sec 0
    ratio_row "fan-out relay CPU µs / delivery" lower "$a.fanout" "$b.fanout" .relay_cpu_us_per_delivery 2
    ratio_row "fan-out deliveries/s per relay core" higher "$a.fanout" "$b.fanout" .deliveries_per_relay_cpu_sec 0
    ratio_row "fan-out Redis CPU µs / append" lower "$a.fanout" "$b.fanout" .redis_cpu_us_per_stored 1
    ratio_row "fan-out p99 (ms)" lower "$a.fanout" "$b.fanout" .lat_p99_ms 1
    ratio_row "rate deliveries/s" higher "$a.rate" "$b.rate" .deliveries_per_sec 0
    ratio_row "rate relay CPU µs / delivery" lower "$a.rate" "$b.rate" .relay_cpu_us_per_delivery 2
    ratio_row "rate deliveries/s per relay core" higher "$a.rate" "$b.rate" .deliveries_per_relay_cpu_sec 0
    ratio_row "rate Redis CPU µs / append" lower "$a.rate" "$b.rate" .redis_cpu_us_per_stored 1
    ratio_row "rate p99 (ms)" lower "$a.rate" "$b.rate" .lat_p99_ms 1
    ratio_row "idle relay KiB / connection" lower "$a.idle" "$b.idle" .relay_kib_per_conn 2
    ratio_row "idle Redis bytes / connection" lower "$a.idle" "$b.idle" .redis_bytes_per_conn 0
  done
}

cost_model() { # relay CPU = a × appends + b × deliveries, solved from the two scenarios
  local c
  # The smoke form's runs last a second or two: CPU ticks (10 ms) and fixed costs swamp them.
  [ "$short" -eq 0 ] || return 0
  echo
  echo "### Relay cost model"
  echo
  echo "Relay CPU seconds = a × appends + b × deliveries, solved per configuration from the fan-out"
  echo "and rate scenarios (relay CPU, appends and deliveries summed over the rounds); a relay core then delivers 10⁶ ÷ (a/F + b)"
  echo "per second at F deliveries per append."
  echo
  echo "| Configuration | a: µs per append | b: µs per delivery | deliveries/s per core at F = 4 | F = 20 | F = 100 |"
  echo "|---|--:|--:|--:|--:|--:|"
  for c in ${configs//,/ }; do
    awk -v l="$(config_label "$c")" \
      -v c1="$(total_of "$c.fanout" .relay_cpu_secs)" -v a1="$(total_of "$c.fanout" .acked)" \
      -v d1="$(total_of "$c.fanout" .deliveries)" -v c2="$(total_of "$c.rate" .relay_cpu_secs)" \
      -v a2="$(total_of "$c.rate" .acked)" -v d2="$(total_of "$c.rate" .deliveries)" 'BEGIN {
      det = a1 * d2 - a2 * d1
      if (c1 == "" || c2 == "" || det == 0) { printf "| %s | - | - | - | - | - |\n", l; exit }
      a = (c1 * d2 - c2 * d1) / det * 1e6; b = (a1 * c2 - a2 * c1) / det * 1e6
      # Negative parts mean the two scenarios disagree beyond the model (noise, or a machine
      # that was busier in one of them): shown, but flagged.
      printf "| %s | %.1f | %.2f%s", l, a, b, (a < 0 || b < 0 ? " (inconsistent: noise)" : "")
      split("4 20 100", fs, " ")
      for (i = 1; i <= 3; i++) { per = a / fs[i] + b; if (per > 0) printf " | %d", 1e6 / per; else printf " | -" }
      print " |"
    }'
  done
}

report_text="$(report)"
echo "$report_text"
if [ -n "$out" ]; then echo "$report_text" >"$out"; say "wrote $out"; fi
if [ "$failed" -ne 0 ]; then say "FAILED (a run lost, duplicated or reordered messages, or failed)"; exit 1; fi
say "passed"
