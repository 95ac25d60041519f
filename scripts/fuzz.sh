#!/usr/bin/env bash
# Fuzz the client envelope parser and dispatcher (fuzz/fuzz_targets/envelope.rs) with
# cargo-fuzz / libFuzzer. Not part of CI: run it by hand before touching src/protocol or
# src/dispatch.
#
#   scripts/fuzz.sh [SECONDS]        # default 300
#
# Extra libFuzzer flags can be given in FUZZ_ARGS, e.g. FUZZ_ARGS="-jobs=2 -workers=2".
#
# Toolchain: cargo-fuzz needs nightly-only flags (-Zsanitizer=address, sanitizer coverage). This
# project's machines have the stable toolchain only, so the script sets RUSTC_BOOTSTRAP=1, which
# makes stable rustc accept them. That is for this fuzz build only; nothing else uses it.
#
# Corpus: fuzz/corpus/envelope/seed-* are committed seeds; libFuzzer adds what it finds next to
# them (git-ignored). A crash leaves its input in fuzz/artifacts/envelope/ and this script exits
# non-zero; reproduce it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run envelope fuzz/artifacts/envelope/<file>   (from fuzz/)
# and shrink it with `cargo fuzz tmin envelope <file>`.
#
# If cargo-fuzz ever cannot be used (no C++ compiler for libFuzzer, a platform without ASan),
# the same checks can be driven by `bolero` (a crates.io fuzzing front-end that also runs on
# stable as a plain `cargo test` harness); the invariants live in the target file unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-300}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [[ "$seconds" -eq 0 ]]; then
    echo "usage: $0 [SECONDS]   (a positive whole number; default 300)" >&2
    exit 2
fi

say() { printf '[fuzz] %s\n' "$*" >&2; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz (a few minutes, once)"
    cargo install cargo-fuzz --locked
fi
if ! command -v c++ >/dev/null 2>&1; then
    say "libFuzzer is C++: install a C++ compiler first (apt-get install g++)"
    exit 1
fi

export RUSTC_BOOTSTRAP=1
artifacts="fuzz/artifacts/envelope"
mkdir -p "$artifacts" fuzz/corpus/envelope
before="$(find "$artifacts" -type f | wc -l)"

say "building and running target 'envelope' for ${seconds}s"
status=0
# FUZZ_ARGS is split on purpose: it holds several libFuzzer flags.
# shellcheck disable=SC2086
(cd fuzz && cargo fuzz run envelope -- -max_total_time="$seconds" -dict=envelope.dict \
    -print_final_stats=1 ${FUZZ_ARGS:-}) || status=$?

after="$(find "$artifacts" -type f | wc -l)"
corpus="$(find fuzz/corpus/envelope -type f | wc -l)"
say "corpus: ${corpus} inputs in fuzz/corpus/envelope/"
say "crashes, leaks and timeouts are saved in ${artifacts}/ (now ${after} files, ${before} before)"
if [[ "$status" -ne 0 || "$after" -gt "$before" ]]; then
    say "FAILED (exit ${status}): see the panic above and the new files in ${artifacts}/"
    exit "$(( status != 0 ? status : 1 ))"
fi
say "no crash in ${seconds}s"
