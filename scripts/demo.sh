#!/usr/bin/env bash
# Builds migd and the test guest, boots a 1 GiB, 2-vCPU demo VM for a few
# seconds and shows its serial console.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
scripts/build-guest.sh
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
echo "demo: booting target/guest/testguest.elf (1 GiB, 2 vCPUs, workload=dirty:64:32) for ${DEMO_SECONDS:-6} s"
target/release/migd run --kernel target/guest/testguest.elf --cmdline 'workload=dirty:64:32' \
  --memory 1G --cpus 2 --serial "$dir/console.log" &
pid=$!
sleep "${DEMO_SECONDS:-6}"
kill -TERM "$pid"
wait "$pid"
echo "---- serial console ----"
cat "$dir/console.log"
