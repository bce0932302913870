#!/usr/bin/env bash
# The test command (README.md; .ci/run calls it): setup, guest, format, lint, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --quiet
scripts/build-guest.sh
cargo fmt --all -- --check
(cd crates/testguest && cargo fmt -- --check)
cargo clippy --workspace --all-targets --locked -- -D warnings
(cd crates/testguest && CARGO_TARGET_DIR=../../target/guest-build cargo clippy --release --locked -- -D warnings)
cargo test --workspace --locked -- --test-threads=2
