#!/usr/bin/env bash
# A repeatable fault run against two relay nodes sharing one Redis, with separate LLM workers.
#
#   scripts/chaos.sh            # full run: 8 rooms x 6 clients, 30 s of traffic, two rounds of faults
#   scripts/chaos.sh --short    # CI: 3 rooms x 4 clients, 10 s, one round (well under a minute)
#
# Options: --short, --keep (keep the temp dir with every log even on success), --no-build,
# --profile debug|release (default: debug with --short, release otherwise), --cluster.
#
# This script only builds; the run is the driver's (`chaos run`, tools/src/bin/chaos/): it starts
#   redis-server  --appendonly yes --appendfsync always --maxmemory-policy noeviction (temp dir)
#                 (--cluster: a local 3-master cluster via scripts/cluster.sh, appendfsync always)
#   chat-relay serve --llm off   x2 (node 1, node 2), rate limits lifted, --redis-timeout-ms 1000
#   chat-relay llm-worker        x2 (consumers w1, w2), --llm-claim-idle-secs 2
#   a fake OpenAI-compatible server streaming N tokens, 100 ms apart
#   the clients, which reconnect with last_id and resend unacked messages with the same cid
# all on 127.0.0.1 and free ports, each stopped by its PID at the end. While the clients send, at
# fixed times after they all joined (full run; --short plays the first round in 8.5 s):
#    3 s  kill -9 node 2          5 s  restart it on the same port
#    8 s  kill -9 redis          10 s  restart it on the same port and dir (AOF)
#   12 s  kill -9 the LLM worker holding the most turn leases, i.e. mid-turn (waits up to 5 s
#         for one to be running)                                           14 s  restart it
#   16 s  kill -9 node 1         18 s  restart it
#   20 s  SIGTERM redis          22 s  restart it
#   24 s  kill -9 the busiest LLM worker again                            26 s  restart it
# (--cluster: the Redis fault stops the master holding the most rooms with SIGTERM and restarts it
# on its nodes.conf + AOF until every master reports cluster_state:ok.) Key names (rooms, turn
# leases) come from the chat-relay library. Then the driver waits for acks, LLM answers and
# deliveries and prints the faults, the summary and one JSON line. Exit 0: every check passed;
# 1: a violation (or a process died on its own, a panic, a timeout); 2: the run could not be set
# up. After the build, the run is bounded: about 15 s with --short, 35 s for the full run. Logs
# are kept in the temp dir on failure (or with --keep): node1.log node2.log worker1.log
# worker2.log redis.log faults.log (--cluster: redis-<port>.log per master, cluster.log).
# The run passes no RELAY_* setting of yours on, except CHAOS_RELAY_LOG as the processes' log
# filter, e.g. CHAOS_RELAY_LOG=info,chat_relay::room=debug,chat_relay::store::feed=trace shows
# every room recovery and held batch.
set -euo pipefail
cd "$(dirname "$0")/.."

short=0
build=1
profile=""
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --short) short=1; args+=(--short) ;;
        --keep) args+=(--keep) ;;
        --cluster) args+=(--cluster) ;;
        --no-build) build=0 ;;
        --profile) profile="${2:-}"; shift ;;
        --profile=*) profile="${1#*=}" ;;
        -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z "$profile" ]]; then
    if [[ $short -eq 1 ]]; then profile=debug; else profile=release; fi
fi
case "$profile" in
    debug) cargo_flag=() ;;
    release) cargo_flag=(--release) ;;
    *) echo "--profile: debug or release" >&2; exit 2 ;;
esac

if [[ $build -eq 1 ]]; then
    echo "[chaos.sh] building chat-relay and chaos ($profile)" >&2
    cargo build --quiet "${cargo_flag[@]}" --workspace --bins
fi
relay="${CARGO_TARGET_DIR:-target}/$profile/chat-relay"
chaos="${CARGO_TARGET_DIR:-target}/$profile/chaos"
for b in "$relay" "$chaos"; do
    [[ -x "$b" ]] || { echo "[chaos.sh] $b not found (build with cargo build ${cargo_flag[*]} --workspace --bins)" >&2; exit 2; }
done
exec "$chaos" run --relay-bin "$relay" --cluster-script scripts/cluster.sh "${args[@]}"
