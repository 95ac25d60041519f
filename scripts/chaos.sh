#!/usr/bin/env bash
# A repeatable fault run against two relay nodes sharing one Redis, with separate LLM workers.
#
#   scripts/chaos.sh            # full run: 8 rooms x 6 clients, 30 s of traffic, two rounds of faults
#   scripts/chaos.sh --short    # CI: 3 rooms x 4 clients, 10 s, one round (well under a minute)
#
# Options: --short, --keep (keep the temp dir with every log even on success), --no-build,
# --profile debug|release (default: debug with --short, release otherwise), --cluster.
#
# --cluster: the same run against a local 3-master Redis Cluster (scripts/cluster.sh start in the
# temp dir, then appendfsync always on each master); relays and workers get --redis-cluster SEEDS.
# The Redis fault restarts ONE master (the one holding the most rooms): SIGTERM via its pidfile,
# then the same redis-server command again (same dir: nodes.conf + AOF), until it reports
# cluster_state:ok. The cluster is stopped (scripts/cluster.sh stop) on exit.
#
# What it starts, all on 127.0.0.1 and free ports, each stopped by its PID on exit:
#   redis-server  --appendonly yes --appendfsync always --maxmemory-policy noeviction (temp dir)
#   chat-relay serve --llm off   x2 (node 1, node 2), rate limits lifted, --redis-timeout-ms 1000
#   chat-relay llm-worker        x2 (consumers w1, w2), --llm-claim-idle-secs 2
#   chaos fake-llm               an OpenAI-compatible server streaming N tokens, 100 ms apart
#   chaos drive                  the clients and the checks (src/bin/chaos.rs)
# While the clients run, at fixed times after they all joined (full run; --short compresses it):
#    3 s  kill -9 node 2          5 s  restart it on the same port
#    8 s  kill -9 redis          10 s  restart it on the same port and dir (AOF)
#   12 s  kill -9 the LLM worker holding the most turn leases, i.e. mid-turn (waits up to 5 s
#         for one to be running)                                           14 s  restart it
#   16 s  kill -9 node 1         18 s  restart it
#   20 s  SIGTERM redis          22 s  restart it
#   24 s  kill -9 the busiest LLM worker again                            26 s  restart it
# Then the driver waits for acks, LLM answers and deliveries and prints the summary and one JSON
# line. Exit 0: every check passed; 1: a violation (or a process died on its own, or a timeout);
# 2: the run could not be set up. After the build, the run is bounded (driver --timeout plus a
# backstop here): about 15 s with --short, 35 s for the full run. Logs are kept in the temp dir on
# failure (or with --keep): node1.log node2.log worker1.log worker2.log redis.log faults.log
# (--cluster: redis-<port>.log per master, cluster.log).
set -euo pipefail
cd "$(dirname "$0")/.."

short=0
keep=0
cluster=0
build=1
profile=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --short) short=1 ;;
        --keep) keep=1 ;;
        --no-build) build=0 ;;
        --profile) profile="${2:-}"; shift ;;
        --profile=*) profile="${1#*=}" ;;
        --cluster) cluster=1 ;;
        -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# ---- parameters -------------------------------------------------------------------------------
if [[ $short -eq 1 ]]; then
    rooms=3; clients=4; duration=10; llm_every=10; tokens=15; token_ms=100
    ack_wait=15; llm_wait=10; drain_wait=10; deadline=75
    # seconds after the clients joined, action
    timeline=(
        "1.5 kill_node 2"
        "3.0 start_node 2"
        "4.5 kill_redis KILL"
        "6.0 start_redis"
        "7.0 kill_busy_worker"
        "8.5 start_killed_worker"
    )
    : "${profile:=debug}"
else
    rooms=8; clients=6; duration=30; llm_every=40; tokens=20; token_ms=100
    ack_wait=20; llm_wait=30; drain_wait=15; deadline=180
    timeline=(
        "3 kill_node 2"
        "5 start_node 2"
        "8 kill_redis KILL"
        "10 start_redis"
        "12 kill_busy_worker"
        "14 start_killed_worker"
        "16 kill_node 1"
        "18 start_node 1"
        "20 kill_redis TERM"
        "22 start_redis"
        "24 kill_busy_worker"
        "26 start_killed_worker"
    )
    : "${profile:=release}"
fi
case "$profile" in
    debug) cargo_flag=() ;;
    release) cargo_flag=(--release) ;;
    *) echo "--profile: debug or release" >&2; exit 2 ;;
esac

start_s="${EPOCHREALTIME}"
elapsed() { awk -v a="$start_s" -v b="${EPOCHREALTIME}" 'BEGIN { printf "%6.1f", b - a }'; }
say() { printf '[chaos.sh %ss] %s\n' "$(elapsed)" "$*" >&2; }

for tool in redis-server redis-cli; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        say "$tool is missing: run scripts/setup.sh (or apt-get install redis-server)"
        exit 2
    fi
done

if [[ $build -eq 1 ]]; then
    say "building chat-relay and chaos ($profile)"
    cargo build --quiet "${cargo_flag[@]}" --bin chat-relay --bin chaos
fi
relay="target/$profile/chat-relay"
chaos="target/$profile/chaos"
for b in "$relay" "$chaos"; do
    [[ -x "$b" ]] || { say "$b not found (build with cargo build ${cargo_flag[*]} --bins)"; exit 2; }
done

# The relay reads RELAY_* from the environment; the run must not inherit someone's settings.
while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^RELAY_' || true)

tmp="$(mktemp -d "${TMPDIR:-/tmp}/chat-relay-chaos.XXXXXX")"
mkdir -p "$tmp/redis"
declare -A pids=()
result=2
cluster_dir="$tmp/cluster"
cluster_ports=()

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local name pid
    for name in "${!pids[@]}"; do
        pid="${pids[$name]}"
        kill -TERM "$pid" 2>/dev/null || true
    done
    for _ in $(seq 1 30); do
        local alive=0
        for name in "${!pids[@]}"; do
            kill -0 "${pids[$name]}" 2>/dev/null && alive=1
        done
        [[ $alive -eq 0 ]] && break
        sleep 0.1
    done
    for name in "${!pids[@]}"; do
        kill -KILL "${pids[$name]}" 2>/dev/null || true
        wait "${pids[$name]}" 2>/dev/null || true
    done
    if [[ $cluster -eq 1 && -d "$cluster_dir" ]]; then
        # cluster.sh stop removes its dir: keep the servers' logs next to the others first.
        local log
        for log in "$cluster_dir"/*/redis.log; do
            [[ -f "$log" ]] && cp "$log" "$tmp/redis-$(basename "$(dirname "$log")").log"
        done
        scripts/cluster.sh stop "$cluster_dir" 2>/dev/null || true
    fi
    if [[ $result -eq 0 && $keep -eq 0 ]]; then
        rm -rf "$tmp"
    else
        say "logs kept in $tmp (node1.log node2.log worker1.log worker2.log redis*.log drive.out faults.log)"
    fi
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

mapfile -t ports < <("$chaos" free-ports 4)
redis_port="${ports[0]}"
node_port=(unused "${ports[1]}" "${ports[2]}")
llm_port="${ports[3]}"
redis_url="redis://127.0.0.1:${redis_port}"
redis_args=(--redis-url "$redis_url")  # for the relays and workers
drive_redis=(--redis "$redis_url")     # for the driver
run="r$(date +%s)"

t0=""
since_send() { awk -v a="$t0" -v b="${EPOCHREALTIME}" 'BEGIN { printf "%5.1f", b - a }'; }
fault() {
    say "FAULT (+$(since_send)s after sending began): $*"
    printf 'script %ss  send+%ss  epoch %s  %s\n' "$(elapsed)" "$(since_send)" "${EPOCHREALTIME}" "$*" >>"$tmp/faults.log"
}

# ---- processes ---------------------------------------------------------------------------------
start_redis() {
    redis-server --port "$redis_port" --bind 127.0.0.1 --protected-mode yes \
        --dir "$tmp/redis" --appendonly yes --appendfsync always --save '' \
        --maxmemory 1gb --maxmemory-policy noeviction \
        --logfile "$tmp/redis.log" --daemonize no >/dev/null 2>&1 &
    pids[redis]=$!
    for _ in $(seq 1 100); do
        [[ "$(redis-cli -p "$redis_port" ping 2>/dev/null || true)" == "PONG" ]] && return 0
        kill -0 "${pids[redis]}" 2>/dev/null || { say "redis-server exited (see $tmp/redis.log)"; return 1; }
        sleep 0.1
    done
    say "redis-server did not answer on :$redis_port"
    return 1
}

stop_pid() { # name signal [grace seconds]
    local name="$1" sig="$2" grace="${3:-5}" pid="${pids[$1]:-}"
    [[ -n "$pid" ]] || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if (( waited >= grace * 10 )); then
            kill -KILL "$pid" 2>/dev/null || true
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    wait "$pid" 2>/dev/null || true
    unset "pids[$name]"
} 2>/dev/null # bash's "Killed" job notice

kill_redis() { fault "kill -$1 redis-server (pid ${pids[redis]})"; stop_pid redis "$1"; }

# ---- cluster mode ------------------------------------------------------------------------------

start_cluster() {
    local seeds port
    seeds="$(scripts/cluster.sh start "$cluster_dir" 2>>"$tmp/cluster.log")" \
        || { say "scripts/cluster.sh start failed (see $tmp/cluster.log)"; return 1; }
    IFS=, read -r -a cluster_ports <<<"$seeds"
    cluster_ports=("${cluster_ports[@]##*:}")
    [[ ${#cluster_ports[@]} -eq 3 ]] || { say "unexpected seed list: $seeds"; return 1; }
    for port in "${cluster_ports[@]}"; do
        [[ "$(redis-cli -p "$port" config set appendfsync always 2>/dev/null)" == "OK" ]] \
            || { say "config set appendfsync always failed on :$port"; return 1; }
    done
    redis_args=(--redis-cluster "$seeds")
    drive_redis=(--redis-cluster "$seeds")
}

master_pid() { cat "$cluster_dir/$1/redis.pid" 2>/dev/null; }

# The redis-server command line that started the master on port $1. redis-server rewrites its
# process title ("redis-server 127.0.0.1:PORT [cluster]"), so ps shows the arguments only when
# the title keeps them; otherwise it is rebuilt as scripts/cluster.sh starts a node, with
# appendfsync always (set at runtime after the start, see start_cluster).
master_cmd=()
read_master_cmd() {
    local port="$1" dir="$cluster_dir/$1" args
    args="$(ps -o args= -p "$(master_pid "$port")" 2>/dev/null || true)"
    if [[ "$args" == redis-server*--cluster-enabled* ]]; then
        read -r -a master_cmd <<<"$args"
        local i
        for ((i = 0; i < ${#master_cmd[@]}; i++)); do
            [[ "${master_cmd[i]}" == --appendfsync ]] && master_cmd[i + 1]=always
            [[ "${master_cmd[i]}" == --save && "${master_cmd[i + 1]:-}" == '""' ]] && master_cmd[i + 1]=""
        done
    else
        master_cmd=(redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes
            --cluster-config-file "$dir/nodes.conf" --dir "$dir"
            --appendonly yes --appendfsync always --save "" --maxmemory-policy noeviction
            --logfile "$dir/redis.log" --daemonize yes --pidfile "$dir/redis.pid")
    fi
}

# The master holding the most of this run's rooms (KEYS/SCAN see one node: ask each).
busiest_master() {
    local port n best="${cluster_ports[0]}" most=-1
    for port in "${cluster_ports[@]}"; do
        n="$(redis-cli -p "$port" --scan --pattern "chat:session:chaos-${run}-*" 2>/dev/null | wc -l)"
        if (( n > most )); then most=$n; best=$port; fi
    done
    echo "$best"
}

killed_master=""
kill_master() {
    local port pid rooms
    port="$(busiest_master)"
    pid="$(master_pid "$port")"
    rooms="$(redis-cli -p "$port" --scan --pattern "chat:session:chaos-${run}-*" 2>/dev/null \
        | sed "s/^chat:session:chaos-${run}-//" | sort -n | paste -sd, -)"
    read_master_cmd "$port"
    killed_master="$port"
    fault "kill -TERM redis master :$port (pid $pid; rooms ${rooms:-none}) (asked: $1; a cluster restart uses SIGTERM)"
    kill -TERM "$pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if (( waited >= 100 )); then kill -KILL "$pid" 2>/dev/null || true; fi
        sleep 0.05
        waited=$((waited + 1))
    done
}

cluster_ok() { redis-cli -p "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; }

start_master() {
    local port="$killed_master"
    [[ -n "$port" ]] || return 0
    fault "restart redis master :$port (same dir: nodes.conf + AOF): ${master_cmd[*]}"
    "${master_cmd[@]}" >>"$tmp/cluster.log" 2>&1 || { say "redis-server :$port did not start"; return 1; }
    local tries p
    for ((tries = 0; tries < 300; tries++)); do
        local all=1
        for p in "${cluster_ports[@]}"; do cluster_ok "$p" || all=0; done
        if (( all )); then
            killed_master=""
            fault "cluster_state:ok on every master again"
            return 0
        fi
        sleep 0.1
    done
    say "the cluster did not report cluster_state:ok within 30 s after restarting :$port"
    return 1
}

masters_down() { # prints the ports of masters that are not running
    local port pid
    for port in "${cluster_ports[@]}"; do
        pid="$(master_pid "$port")"
        if [[ -z "$pid" ]] || ! kill -0 "$pid" 2>/dev/null; then echo "redis:$port"; fi
    done
}

start_node() {
    local i="$1"
    [[ -n "${pids[node$i]:-}" ]] && return 0
    "$relay" serve --listen "127.0.0.1:${node_port[$i]}" "${redis_args[@]}" --llm off \
        --redis-timeout-ms 1000 \
        --msgs-per-sec 100000 --msgs-burst 100000 \
        --room-msgs-per-sec 100000 --room-msgs-burst 100000 \
        >>"$tmp/node$i.log" 2>&1 &
    pids[node$i]=$!
    "$chaos" wait-http "http://127.0.0.1:${node_port[$i]}/healthz" --timeout-secs 20 \
        || { say "node $i did not come up (see $tmp/node$i.log)"; return 1; }
}

kill_node() { fault "kill -9 node $1 (pid ${pids[node$1]})"; stop_pid "node$1" KILL; }

start_worker() {
    local i="$1"
    "$relay" llm-worker "${redis_args[@]}" --redis-timeout-ms 1000 \
        --llm-base-url "http://127.0.0.1:${llm_port}/v1" --llm-consumer "w$i" \
        --llm-claim-idle-secs 2 --llm-turns-per-minute 100000 --llm-concurrency 32 \
        >>"$tmp/worker$i.log" 2>&1 &
    pids[worker$i]=$!
}

killed_worker=""
kill_busy_worker() {
    # A turn in progress holds its lease key chat:llm:turn:{chat:session:<sid>}:<turn> with the
    # value "<consumer>/<turn>" (then "done:<reply id>"). Wait (up to 5 s) until some worker holds
    # one, then kill -9 the worker holding the most: it dies mid-turn.
    # On a cluster every master holds its own rooms' keys: SCAN and GET on each.
    local keys=() vals=() k n1=0 n2=0 ids1=() ids2=() tries port
    local scan_ports=("$redis_port")
    [[ $cluster -eq 1 ]] && scan_ports=("${cluster_ports[@]}")
    for ((tries = 0; tries < 50; tries++)); do
        keys=() vals=()
        for port in "${scan_ports[@]}"; do
            local pk=() pv=()
            mapfile -t pk < <(redis-cli -p "$port" --scan --pattern 'chat:llm:turn:*' 2>/dev/null || true)
            [[ ${#pk[@]} -gt 0 ]] || continue
            mapfile -t pv < <(printf 'GET %s\n' "${pk[@]}" | redis-cli -c -p "$port" --raw 2>/dev/null || true)
            # A failed GET batch must not shift keys against values.
            [[ ${#pv[@]} -eq ${#pk[@]} ]] || continue
            keys+=("${pk[@]}") vals+=("${pv[@]}")
        done
        n1=0 n2=0 ids1=() ids2=()
        for ((k = 0; k < ${#vals[@]} && k < ${#keys[@]}; k++)); do
            local room="${keys[k]#*chaos-"${run}"-}"
            room="room ${room%%\}*}"
            case "${vals[k]}" in
                w1/*) n1=$((n1 + 1)); ids1+=("$room turn ${vals[k]#w1/}") ;;
                w2/*) n2=$((n2 + 1)); ids2+=("$room turn ${vals[k]#w2/}") ;;
            esac
        done
        (( n1 + n2 > 0 )) && break
        sleep 0.1
    done
    local ids=()
    if (( n2 > n1 )); then killed_worker=2; ids=("${ids2[@]}"); else killed_worker=1; ids=("${ids1[@]}"); fi
    local shown
    shown="$(printf '%s, ' "${ids[@]:0:6}")"
    fault "kill -9 LLM worker w$killed_worker (pid ${pids[worker$killed_worker]:-?}) in the middle of ${#ids[@]} turns (w1 $n1, w2 $n2 running): ${shown%, }${ids[6]:+, ...}"
    stop_pid "worker$killed_worker" KILL
}

start_killed_worker() {
    [[ -n "$killed_worker" ]] || return 0
    fault "restart LLM worker w$killed_worker"
    start_worker "$killed_worker"
}

start_node_logged() { fault "restart node $1 on :${node_port[$1]}"; start_node "$1"; }
start_redis_logged() { fault "restart redis-server on :$redis_port (same dir, AOF)"; start_redis; }

# ---- run ---------------------------------------------------------------------------------------
if [[ $cluster -eq 1 ]]; then
    start_cluster || exit 2
    say "temp dir $tmp; redis cluster :${cluster_ports[*]}, nodes :${node_port[1]} :${node_port[2]}, fake LLM :$llm_port, run $run"
else
    say "temp dir $tmp; redis :$redis_port, nodes :${node_port[1]} :${node_port[2]}, fake LLM :$llm_port, run $run"
    start_redis || exit 2
fi
"$chaos" fake-llm --port "$llm_port" --delay-ms "$token_ms" --tokens "$tokens" >"$tmp/fake-llm.log" 2>&1 &
pids[fake_llm]=$!
"$chaos" wait-http "http://127.0.0.1:${llm_port}/healthz" --timeout-secs 10 || { say "fake LLM did not start"; exit 2; }
start_node 1 || exit 2
start_node 2 || exit 2
start_worker 1
start_worker 2

"$chaos" drive --nodes "ws://127.0.0.1:${node_port[1]},ws://127.0.0.1:${node_port[2]}" \
    "${drive_redis[@]}" --run "$run" --rooms "$rooms" --clients "$clients" \
    --duration "$duration" --llm-every "$llm_every" \
    --ack-wait "$ack_wait" --llm-wait "$llm_wait" --drain-wait "$drain_wait" \
    --timeout "$deadline" --ready-file "$tmp/ready" >"$tmp/drive.out" &
pids[drive]=$!
driver="${pids[drive]}"

# Wait for every client to join, then play the timeline relative to that moment.
for _ in $(seq 1 300); do
    [[ -s "$tmp/ready" ]] && break
    kill -0 "$driver" 2>/dev/null || break
    sleep 0.1
done
if [[ ! -s "$tmp/ready" ]]; then
    say "the driver did not start sending"
    wait "$driver" 2>/dev/null || true
    unset "pids[drive]"
    cat "$tmp/drive.out" 2>/dev/null || true
    exit 2
fi
t0="${EPOCHREALTIME}"
for step in "${timeline[@]}"; do
    at="${step%% *}"
    action="${step#* }"
    while awk -v a="$t0" -v b="${EPOCHREALTIME}" -v t="$at" 'BEGIN { exit !(b - a < t) }'; do
        kill -0 "$driver" 2>/dev/null || break 2
        sleep 0.05
    done
    case "$action" in
        "kill_node "*) kill_node "${action#kill_node }" ;;
        "start_node "*) start_node_logged "${action#start_node }" || true ;;
        "kill_redis "*)
            if [[ $cluster -eq 1 ]]; then kill_master "${action#kill_redis }"; else kill_redis "${action#kill_redis }"; fi ;;
        start_redis)
            if [[ $cluster -eq 1 ]]; then start_master || true; else start_redis_logged || true; fi ;;
        kill_busy_worker) kill_busy_worker ;;
        start_killed_worker) start_killed_worker ;;
        *) say "unknown timeline action: $action"; exit 2 ;;
    esac
done

# Every process must still be up (a crash on its own is a finding too).
crashed=()
redis_names=(redis)
[[ $cluster -eq 1 ]] && redis_names=()
if [[ $cluster -eq 1 ]]; then mapfile -t crashed < <(masters_down); fi
for name in "${redis_names[@]}" node1 node2 worker1 worker2 fake_llm; do
    pid="${pids[$name]:-}"
    if [[ -z "$pid" ]] || ! kill -0 "$pid" 2>/dev/null; then
        crashed+=("$name")
    fi
done

# The driver bounds itself (--timeout); this is the backstop.
limit=$((deadline + 15))
waited=0
while kill -0 "$driver" 2>/dev/null; do
    if (( waited >= limit * 10 )); then
        say "the driver exceeded ${limit}s; stopping it"
        kill -KILL "$driver" 2>/dev/null || true
        break
    fi
    sleep 0.1
    waited=$((waited + 1))
done
drive_rc=0
wait "$driver" || drive_rc=$?
unset "pids[drive]"

# Processes that died during the drain count too.
if [[ $cluster -eq 1 ]]; then
    while IFS= read -r name; do
        [[ " ${crashed[*]} " == *" $name "* ]] || crashed+=("$name")
    done < <(masters_down)
fi
for name in "${redis_names[@]}" node1 node2 worker1 worker2 fake_llm; do
    pid="${pids[$name]:-}"
    if [[ -z "$pid" ]] || ! kill -0 "$pid" 2>/dev/null; then
        [[ " ${crashed[*]} " == *" $name "* ]] || crashed+=("$name")
    fi
done

echo
echo "faults (script = since the script started; send+ = since the clients began sending):"
sed 's/^/  /' "$tmp/faults.log"
panics="$(grep -l 'panicked' "$tmp"/node*.log "$tmp"/worker*.log 2>/dev/null || true)"
cat "$tmp/drive.out"

result=$drive_rc
if [[ ${#crashed[@]} -gt 0 ]]; then
    echo "VIOLATION: processes not running at the end: ${crashed[*]}"
    result=1
fi
if [[ -n "$panics" ]]; then
    echo "VIOLATION: panics in: $panics"
    result=1
fi
if [[ $result -eq 0 ]]; then
    say "PASS"
else
    say "FAIL (exit $result)"
fi
exit "$result"
