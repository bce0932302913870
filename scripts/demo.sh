#!/usr/bin/env bash
# The main job, on one machine: builds migd and the test guest, starts two
# daemons ("host A" and "host B" on loopback), creates a 1 GiB, 2-vCPU VM on
# A, migrates it live to B (pre-copy) and back (post-copy) with migctl, and
# shows that the guest kept running and checking itself throughout.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q
scripts/build-guest.sh >/dev/null
bin=target/release
dir=$(mktemp -d)
pids=()
cleanup() {
    for s in a b; do "$bin/migctl" --socket "$dir/$s.sock" destroy demo1 >/dev/null 2>&1 || true; done
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pa=$(free_port)
pb=$(free_port)
for s in a b; do
    port=$pa; [ "$s" = b ] && port=$pb
    # --boot-dir: the guest's kernel, named by the other host, is kept for
    # a later `migctl start` only from there.
    "$bin/migd" --listen "127.0.0.1:$port" --socket "$dir/$s.sock" --state-dir "$dir/$s" \
        --insecure --boot-dir "$PWD/target/guest" 2>"$dir/$s.log" &
    pids+=($!)
done
for s in a b; do
    for _ in $(seq 100); do [ -S "$dir/$s.sock" ] && break; sleep 0.05; done
done
a() { "$bin/migctl" --socket "$dir/a.sock" "$@"; }
b() { "$bin/migctl" --socket "$dir/b.sock" "$@"; }
wait_console() { # host, text
    for _ in $(seq 200); do
        "$bin/migctl" --socket "$dir/$1.sock" console demo1 2>/dev/null | grep -q "$2" && return 0
        sleep 0.1
    done
    echo "demo: '$2' never appeared on host $1's console" >&2
    return 1
}

echo "== host A (127.0.0.1:$pa): create demo1, 1 GiB, 2 vCPUs, rewriting 64 MiB at 32 MiB/s"
a create demo1 --kernel target/guest/testguest.elf --cmdline 'workload=dirty:64:32' \
    --memory 1G --vcpus 2 >/dev/null
wait_console a "WORKLOAD READY"
a list
echo
echo "== live migration A -> B, pre-copy"
a migrate demo1 --to "127.0.0.1:$pb"
echo
echo "== host B (127.0.0.1:$pb) now runs it; host A has nothing"
b list
a list
wait_console b "HEARTBEAT"
echo
echo "== and back B -> A, post-copy (the VM runs on A at once; its pages follow)"
b migrate demo1 --to "127.0.0.1:$pa" --mode postcopy --json |
    python3 -c 'import json,sys; s=json.load(sys.stdin); print("outcome %s, total %.0f ms, downtime %.1f ms, %.0f MiB" % (s["outcome"], s["total_ms"], s["downtime_ms"], s["bytes"]/2**20))'
sleep 2
echo
echo "== the guest's console, last lines (it checks its memory, clock and registers;"
echo "   a problem would print a CORRUPT line)"
a console demo1 | tail -n 6
if a console demo1 | grep -q CORRUPT; then
    echo "demo: the guest reported corruption" >&2
    exit 1
fi
echo
echo "demo: done"
