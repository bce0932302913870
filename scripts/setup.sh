#!/usr/bin/env bash
# Installs what migd needs on a fresh Debian host, idempotently:
#   - gcc and binutils (C parts of the crates, and the linker), libclang-dev (bindgen,
#     for the userfaultfd crate), iproute2 (network namespaces in tests), openssl
#     (scripts/make-certs.sh: TLS certificates for tests and small fleets), python3
#     (scripts/hugepages.sh, the demo and the benchmark)
#   - checks the Rust toolchain (rustc 1.87 or newer) and /dev/kvm
#   - with --tests, as root: a pool of 256 MiB of huge pages (scripts/hugepages.sh),
#     for tests/hugepages.rs (scripts/test.sh asks for it; a production host keeps its pool)
# Usage: scripts/setup.sh [--quiet] [--tests]
set -euo pipefail
quiet=
tests=0
for a in "$@"; do
  case "$a" in
    --quiet) quiet=--quiet ;;
    --tests) tests=1 ;;
    *) echo "setup: unknown argument '$a' (--quiet, --tests)" >&2; exit 2 ;;
  esac
done
say() { [ "$quiet" = "--quiet" ] || echo "setup: $*"; }

need=()
for pkg in gcc binutils libc6-dev libclang-dev iproute2 openssl python3; do
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
# The workspace's rust-version (Debian's own rustc is older).
rustc_version=$(rustc --version | awk '{print $2}')
if ! printf '1.87.0\n%s\n' "${rustc_version%%-*}" | sort -V -C; then
  echo "setup: rustc $rustc_version is older than 1.87: install a newer toolchain (rustup update)" >&2
  exit 1
fi
if [ ! -c /dev/kvm ]; then
  say "warning: /dev/kvm is missing: VMs cannot run on this host"
elif [ ! -w /dev/kvm ]; then
  say "warning: /dev/kvm is not writable by $(id -un)"
fi
# Guest memory on huge pages (tests/hugepages.rs: two tests of 64 free 2 MiB pages each, which may run at once).
if [ "$tests" -eq 1 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    pool=$("$(dirname "$0")/hugepages.sh" 256)
    say "$pool"
  else
    say "note: not root, the huge page pool is left as it is (tests/hugepages.rs may skip)"
  fi
fi
say "ok"
