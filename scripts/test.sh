#!/usr/bin/env bash
# The test command (README.md; .ci/run calls it): setup, guest, format, lint, tests.
# Ends with one summary line: "tests: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --quiet --tests
scripts/build-guest.sh
cargo fmt --all -- --check
(cd crates/testguest && cargo fmt -- --check)
cargo clippy --workspace --all-targets --locked -- -D warnings
(cd crates/testguest && cargo clippy --release --locked -- -D warnings)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets --locked -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
