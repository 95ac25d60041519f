#!/usr/bin/env bash
# The README's second command: set up everything the tests need, then run the whole suite.
#
#   scripts/test.sh
#
# Each integration test starts its own redis-server on a free port (and kills it by PID), so
# nothing here needs a running Redis.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[test] %s\n' "$*" >&2; }

scripts/setup.sh --test

say "cargo fmt --check"
cargo fmt --check
say "cargo clippy --all-targets -- -D warnings"
cargo clippy --quiet --all-targets -- -D warnings
say "cargo test"
cargo test --all-targets 2>&1
