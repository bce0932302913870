#!/usr/bin/env bash
# Installs migd and migctl, the systemd unit, an example config and the state
# directories. Starts nothing unless --enable is given; on a host where systemd
# runs, reloads it so that the unit written is the one it knows (a daemon
# already running keeps running the old binary until restarted).
#
#   scripts/install.sh [--prefix DIR] [--from DIR] [--enable]
#
#   --prefix DIR   install binaries under DIR/bin, docs under DIR/share/doc/migd
#                  (default /usr/local)
#   --from DIR     take migd and migctl from DIR instead of building them
#                  (default: cargo build --release, then target/release)
#   --enable       enable and start migd.service
#
# DESTDIR is respected (staged installs, packaging); --enable is refused with it.
# An existing /etc/migd/migd.toml is kept; the example then goes to migd.toml.example.
set -euo pipefail

die() { echo "install.sh: $*" >&2; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=/usr/local
from=
enable=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --prefix) [[ $# -ge 2 ]] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --from) [[ $# -ge 2 ]] || die "--from needs a directory"; from=$2; shift 2 ;;
        --from=*) from=${1#*=}; shift ;;
        --enable) enable=1; shift ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ "$prefix" = /* ]] || die "--prefix must be an absolute path"
destdir=${DESTDIR:-}
if [[ $enable -eq 1 && -n "$destdir" ]]; then
    die "--enable cannot be used with DESTDIR (nothing is installed on this system)"
fi

if [[ -z "$from" ]]; then
    command -v cargo >/dev/null || die "cargo not found (or use --from DIR)"
    lock=()
    [[ -f "$repo/Cargo.lock" ]] && lock=(--locked)
    (cd "$repo" && cargo build --release "${lock[@]}" -p migd --bins) || die "cargo build failed"
    from="$repo/target/release"
fi
for b in migd migctl; do
    [[ -x "$from/$b" ]] || die "no $b binary in $from"
done

bindir="$destdir$prefix/bin"
docdir="$destdir$prefix/share/doc/migd"
unitdir="$destdir/etc/systemd/system"
confdir="$destdir/etc/migd"
statedir="$destdir/var/lib/migd"

install -d -m 0755 "$bindir" "$docdir" "$unitdir"
install -d -m 0755 "$confdir"
install -d -m 0700 "$statedir"
# Kernels and initramfs images that arriving or restored VMs may boot from
# (the daemon's default boot_dirs).
install -d -m 0755 "$destdir/var/lib/migd-images"
install -m 0755 "$from/migd" "$bindir/migd"
install -m 0755 "$from/migctl" "$bindir/migctl"

# The unit names the installed binary and docs.
sed -e "s#/usr/local/bin/migd#$prefix/bin/migd#" \
    -e "s#/usr/local/share/doc/migd#$prefix/share/doc/migd#" \
    "$repo/migd/dist/migd.service" > "$unitdir/migd.service.tmp"
chmod 0644 "$unitdir/migd.service.tmp"
mv -f "$unitdir/migd.service.tmp" "$unitdir/migd.service"

if [[ -e "$confdir/migd.toml" ]]; then
    install -m 0644 "$repo/migd/dist/migd.toml" "$confdir/migd.toml.example"
    echo "install.sh: kept $confdir/migd.toml; the example is migd.toml.example"
else
    install -m 0644 "$repo/migd/dist/migd.toml" "$confdir/migd.toml"
fi
for doc in cli.md operations.md; do
    if [[ -f "$repo/docs/$doc" ]]; then
        install -m 0644 "$repo/docs/$doc" "$docdir/$doc"
    fi
done

echo "install.sh: installed migd and migctl in $bindir, the unit in $unitdir"
# A unit changed on disk is read only after a daemon-reload (a plain install,
# not staged, on a host with systemd running).
running=0
if [[ -z "$destdir" ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    systemctl is-active --quiet migd.service && running=1
fi
if [[ $running -eq 1 ]]; then
    # An upgrade: the old daemon runs on until restarted (its VMs are kept).
    [[ $enable -eq 1 ]] && systemctl enable migd.service
    echo "install.sh: migd.service is running the old binary; 'systemctl restart migd' starts the new one (VMs keep running)"
elif [[ $enable -eq 1 ]]; then
    command -v systemctl >/dev/null || die "systemctl not found: start $prefix/bin/migd yourself"
    systemctl daemon-reload
    systemctl enable --now migd.service
    echo "install.sh: migd.service enabled and started"
else
    echo "install.sh: nothing started; run 'systemctl enable --now migd' when ready"
fi
