#!/usr/bin/env bash
# Makes sure the host's huge page pool (vm.nr_hugepages, 2 MiB pages) has at least
# MIB MiB free, growing it if needed (root), and touches the free pages once.
#
# Guest memory on huge pages (`migd --hugepages`, `migd run --hugepages`) comes from
# this pool, reserved when a VM's memory is made. On a nested host (kvm-pvm) a page
# the outer hypervisor has not backed yet costs a fault there at its first touch,
# inside the first migration that stores into it; touching the pool once here moves
# that cost to set-up. A pool page stays backed while it is in the pool.
#
# Usage: scripts/hugepages.sh MIB          (e.g. 128 for the tests, 1536 for benchmarks)
set -euo pipefail
mib=${1:?usage: scripts/hugepages.sh MIB}
[[ "$mib" =~ ^[0-9]+$ ]] || { echo "hugepages: MIB must be a number, not '$mib'" >&2; exit 1; }
want=$(( (mib + 1) / 2 ))
field() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }
free=$(field HugePages_Free)
total=$(field HugePages_Total)
if [ "$free" -lt "$want" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "hugepages: $free huge pages free, $want needed; run as root or raise vm.nr_hugepages" >&2
    exit 1
  fi
  echo $(( total + want - free )) > /proc/sys/vm/nr_hugepages
  free=$(field HugePages_Free)
  if [ "$free" -lt "$want" ]; then
    echo "hugepages: the kernel gave $free free huge pages of $want (memory too fragmented?)" >&2
    exit 1
  fi
fi
# Touch every free page once: map them all from a hugetlb memfd, write a byte per page.
python3 - "$free" <<'PY'
import mmap, os, sys
n = int(sys.argv[1]) * (2 << 20)
fd = os.memfd_create("migd-warm", os.MFD_HUGETLB)
os.ftruncate(fd, n)
m = mmap.mmap(fd, n)
for off in range(0, n, 2 << 20):
    m[off] = 1
m.close()
os.close(fd)
PY
echo "hugepages: $free huge pages free ($(( free * 2 )) MiB), touched"
