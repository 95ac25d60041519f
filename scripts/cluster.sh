#!/usr/bin/env bash
# A local 3-master Redis Cluster on free loopback ports, for tests and demos.
#
#   scripts/cluster.sh start [DIR]             start it; prints the seed list for --redis-cluster
#   scripts/cluster.sh stop [DIR]              stop the servers started in DIR (by PID), remove DIR
#   scripts/cluster.sh nodes [DIR]             print the seed list again
#   scripts/cluster.sh start-node DIR PORT     start one (stopped) master again: same nodes.conf, AOF
#
# DIR defaults to ${TMPDIR:-/tmp}/chat-relay-cluster. Each node keeps its nodes.conf, AOF and log
# in DIR/<port>/. CLUSTER_APPENDFSYNC (default everysec) sets appendfsync; the fault run uses always.
set -euo pipefail

cmd="${1:-}"
dir="${2:-${TMPDIR:-/tmp}/chat-relay-cluster}"
say() { printf '[cluster] %s\n' "$*" >&2; }
free_port() {
  # Cluster nodes also listen on port+10000 for the bus: pick ports whose bus port is free too.
  python3 - <<'PY'
import socket
while True:
    a = socket.socket(); a.bind(("127.0.0.1", 0)); p = a.getsockname()[1]
    if p + 10000 > 65535:
        a.close(); continue
    b = socket.socket()
    try:
        b.bind(("127.0.0.1", p + 10000))
    except OSError:
        a.close(); b.close(); continue
    a.close(); b.close(); print(p); break
PY
}

appendfsync="${CLUSTER_APPENDFSYNC:-everysec}"
start_node() { # PORT: one master, daemonized, its files in $dir/PORT
  local port="$1"
  mkdir -p "$dir/$port"
  redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
    --cluster-config-file "$dir/$port/nodes.conf" --dir "$dir/$port" \
    --appendonly yes --appendfsync "$appendfsync" --save "" --maxmemory-policy noeviction \
    --logfile "$dir/$port/redis.log" --daemonize yes --pidfile "$dir/$port/redis.pid"
}

case "$cmd" in
  start)
    if [ -f "$dir/ports" ]; then
      say "already running in $dir"
      paste -sd, "$dir/ports"
      exit 0
    fi
    mkdir -p "$dir"
    : > "$dir/ports"
    for _ in 1 2 3; do
      port=$(free_port)
      start_node "$port"
      echo "127.0.0.1:$port" >> "$dir/ports"
    done
    for hp in $(cat "$dir/ports"); do
      for _ in $(seq 50); do redis-cli -p "${hp##*:}" ping >/dev/null 2>&1 && break; sleep 0.1; done
    done
    # shellcheck disable=SC2046
    redis-cli --cluster create $(cat "$dir/ports") --cluster-replicas 0 --cluster-yes >"$dir/create.log" 2>&1 \
      || { cat "$dir/create.log" >&2; exit 1; }
    for hp in $(cat "$dir/ports"); do
      for _ in $(seq 100); do
        redis-cli -p "${hp##*:}" cluster info 2>/dev/null | grep -q 'cluster_state:ok' && break
        sleep 0.1
      done
    done
    say "3 masters up in $dir"
    paste -sd, "$dir/ports"
    ;;
  stop)
    [ -d "$dir" ] || exit 0
    for pidfile in "$dir"/*/redis.pid; do
      [ -f "$pidfile" ] || continue
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$dir"
    say "stopped"
    ;;
  nodes)
    paste -sd, "$dir/ports"
    ;;
  start-node)
    port="${3:?start-node DIR PORT}"
    grep -qx "127.0.0.1:$port" "$dir/ports" 2>/dev/null || { say "no node :$port in $dir"; exit 2; }
    start_node "$port"
    for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    ;;
  *)
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
