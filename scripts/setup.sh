#!/usr/bin/env bash
# Installs what migd needs on a fresh Debian host, idempotently:
#   - libclang-dev (bindgen, for the userfaultfd crate), iproute2 (network namespaces in tests),
#     openssl (scripts/make-certs.sh: TLS certificates for tests and small fleets)
#   - checks the Rust toolchain and /dev/kvm
#   - as root: a pool of 256 MiB of huge pages (scripts/hugepages.sh), for tests/hugepages.rs
# Usage: scripts/setup.sh [--quiet]
set -euo pipefail
quiet=${1:-}
say() { [ "$quiet" = "--quiet" ] || echo "setup: $*"; }

need=()
for pkg in libclang-dev iproute2 openssl; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing packages ${need[*]}; run as root or install them" >&2
    exit 1
  fi
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "setup: cargo not found: install a Rust toolchain (rustup)" >&2; exit 1; }
if [ ! -c /dev/kvm ]; then
  say "warning: /dev/kvm is missing: VMs cannot run on this host"
elif [ ! -w /dev/kvm ]; then
  say "warning: /dev/kvm is not writable by $(id -un)"
fi
# Guest memory on huge pages (tests/hugepages.rs: two tests of 64 free 2 MiB pages each, which may run at once).
if [ "$(id -u)" -eq 0 ]; then
  say "$("$(dirname "$0")/hugepages.sh" 256)"
else
  say "note: not root, the huge page pool is left as it is (tests/hugepages.rs may skip)"
fi
say "ok"
