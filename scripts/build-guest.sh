#!/usr/bin/env bash
# Build the migd test guest (crates/testguest) and leave OUTDIR/testguest.elf.
#
#   scripts/build-guest.sh [OUTDIR]     (default: <repo>/target/guest)
#
# The crate is a separate cargo workspace with its own target directory
# (<repo>/target/guest-build), so this never waits on the main workspace's
# build lock. A second run with nothing changed takes a few seconds.
set -euo pipefail

die() { echo "build-guest.sh: $*" >&2; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
crate="$repo/crates/testguest"
outdir=${1:-"$repo/target/guest"}

[[ -f "$crate/Cargo.toml" ]] || die "missing $crate/Cargo.toml"
command -v cargo >/dev/null || die "cargo not found in PATH"
command -v cc >/dev/null || die "no C compiler driver 'cc' (the guest is linked with it)"
mkdir -p "$outdir" || die "cannot create output directory $outdir"
outdir=$(cd "$outdir" && pwd)

# The guest's code-generation flags live in crates/testguest/.cargo/config.toml;
# RUSTFLAGS from the environment would silently replace them.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET
export CARGO_TARGET_DIR="$repo/target/guest-build"

cd "$crate"
lock=()
[[ -f Cargo.lock ]] && lock=(--locked)
cargo build --release "${lock[@]}" --quiet || die "cargo build failed"

elf="$CARGO_TARGET_DIR/release/testguest"
[[ -f "$elf" ]] || die "cargo did not produce $elf"

# Sanity checks on the image when binutils are installed.
if command -v readelf >/dev/null; then
    readelf -n "$elf" | grep -q 'Xen.*0x00000008' || die "$elf has no Xen PVH (PHYS32_ENTRY) note"
fi
if command -v objdump >/dev/null; then
    # The ymm upper halves hold known values (ymm15's: the progress counter),
    # so no VEX/EVEX instruction may touch vector registers except the
    # helpers that load/store them (ymm_*_upper for ymm0-14, ymm15_*_upper).
    bad=$(objdump -d --no-show-raw-insn "$elf" | awk '
        /^[0-9a-f]+ <.*>:$/ { fn = $2; next }
        /\t(v[a-z0-9]+|kmov[a-z]*)[ \t].*%[xyz]mm/ || /\tvzero(upper|all)/ {
            if (fn !~ /ymm(15)?_(load|store)_upper/ && fn !~ /sabotage/) print fn ": " $0
        }')
    [[ -z "$bad" ]] || die "VEX-encoded vector instructions outside the ymm helpers (would clobber the checked ymm upper halves):
$bad"
    # CPL-0 code is emulated by kvm-pvm: keep SSE/AVX out of it.
    kend=$(nm "$elf" | awk '$3 == "__kernel_text_end" { print $1 }')
    if [[ -n "$kend" ]] && objdump -d --no-show-raw-insn --stop-address=0x"$kend" "$elf" | grep -q '%[xyz]mm'; then
        die "vector registers used in CPL-0 code (.text.boot/.text.kernel)"
    fi
fi

install -m 0644 "$elf" "$outdir/testguest.elf.tmp"
mv -f "$outdir/testguest.elf.tmp" "$outdir/testguest.elf"
echo "$outdir/testguest.elf"
