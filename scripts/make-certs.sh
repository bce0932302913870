#!/usr/bin/env bash
# Makes a CA and host certificates for migd's TLS (tests and small fleets).
#
#   scripts/make-certs.sh DIR HOST[=ADDR,...] ... [--expired HOST[=ADDR,...]]
#
# DIR/ca.pem, DIR/ca.key: the CA (made once, reused if present);
# DIR/HOST.pem, DIR/HOST.key: a certificate for HOST (DNS name) and the listed
# addresses (IPs or DNS names), usable as TLS server and client, valid 825
# days (--expired: valid from two days ago until yesterday, for tests).
# Example: scripts/make-certs.sh /etc/migd/tls host-a=10.0.0.1 host-b=10.0.0.2
# Then on host-a: tls_ca = ".../ca.pem", tls_cert = ".../host-a.pem",
# tls_key = ".../host-a.key", tls_peers = ["host-b"]. Keep ca.key off the hosts.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,13p' "$0"; exit 2; }
command -v openssl >/dev/null || { echo "make-certs: openssl is needed (apt-get install openssl)" >&2; exit 1; }
dir=$1; shift
mkdir -p "$dir"
umask 077
if [ ! -f "$dir/ca.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=migd CA $(basename "$dir") $(date -u +%Y%m%d%H%M%S)-$$" -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/new"; : > "$work/index"; echo 1000 > "$work/serial"
expired=0
for arg in "$@"; do
  if [ "$arg" = "--expired" ]; then expired=1; continue; fi
  host=${arg%%=*}; addrs=""; [ "$arg" != "$host" ] && addrs=${arg#*=}
  san="DNS:$host"
  IFS=, read -ra list <<< "$addrs"
  for a in "${list[@]}"; do
    [ -z "$a" ] && continue
    if [[ $a =~ ^[0-9.]+$ || $a == *:* ]]; then san="$san,IP:$a"; else san="$san,DNS:$a"; fi
  done
  cat > "$work/ca.cnf" <<CNF
[ca]
default_ca = c
[c]
database = $work/index
new_certs_dir = $work/new
serial = $work/serial
default_md = sha256
policy = p
copy_extensions = none
unique_subject = no
[p]
commonName = supplied
[ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = $san
CNF
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$host" \
    -keyout "$dir/$host.key" -out "$work/$host.csr" 2>/dev/null
  if [ $expired = 1 ]; then
    dates=(-startdate "$(date -u -d '2 days ago' +%y%m%d%H%M%SZ)" -enddate "$(date -u -d '1 day ago' +%y%m%d%H%M%SZ)")
  else
    dates=(-days 825)
  fi
  openssl ca -batch -config "$work/ca.cnf" -extensions ext -cert "$dir/ca.pem" -keyfile "$dir/ca.key" \
    "${dates[@]}" -in "$work/$host.csr" -out "$dir/$host.pem" -notext 2>/dev/null
  echo "$dir/$host.pem ($san)"
  expired=0
done
