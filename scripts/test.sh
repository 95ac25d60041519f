#!/usr/bin/env bash
# The README's second command: set up everything the tests need, then run the whole suite.
#
#   scripts/test.sh
#
# Every part starts its own redis-server (and relay, LLM server, browser) on free ports and stops
# them by PID, so nothing here needs a running Redis. Parts:
#   1. cargo fmt --check, cargo clippy -D warnings (the whole workspace: relay, tools, testkit)
#   2. cargo test: unit tests, integration tests (tests/it), the real local model end to end,
#      and the tools' own tests
#   3. the Python smoke test and the Postman collection check (scripts/smoke-python.sh), then
#      the Postman collection run with newman against a relay and the fake LLM (scripts/postman.sh)
#   4. the browser end-to-end test in headless Chromium (scripts/e2e-browser.sh)
#   5. the short benchmark: no loss, duplicates or reordering under load (scripts/bench.sh --short)
#   6. the short fault run: kill a relay node, restart Redis (AOF), kill an LLM worker mid-turn;
#      nothing acked lost, nothing delivered twice, every LLM turn answered once (scripts/chaos.sh)
#   7. the same on a local 3-master Redis Cluster (scripts/chaos.sh --cluster)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[test] %s\n' "$*" >&2; }

scripts/setup.sh --test

# One build from scratch (CI) gains nothing from incremental caches, which were a gigabyte of
# the suite's disk; a rerun after an edit recompiles the changed crates whole.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

say "cargo fmt --all --check"
cargo fmt --all --check
say "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --quiet --workspace --all-targets -- -D warnings
say "cargo test --workspace"
cargo test --workspace --all-targets 2>&1
say "python smoke test + postman collection"
scripts/smoke-python.sh
say "postman collection run with newman (sessions & chat API included)"
scripts/postman.sh
say "browser end-to-end test"
scripts/e2e-browser.sh
say "short benchmark (fails only on loss, duplicates, reordering or errors)"
scripts/bench.sh --short
say "short fault run: node crash, Redis restart, LLM worker crash"
scripts/chaos.sh --short
say "short fault run on a 3-master Redis Cluster"
scripts/chaos.sh --short --cluster
say "all suites passed"
echo "suites: 7 passed, 0 failed"
