#!/usr/bin/env bash
# Install the Debian packages wrenbox needs on the host. Idempotent: does nothing when all are present.
set -euo pipefail

packages=(
  python3-venv            # the project's virtualenv
  qemu-system-x86 qemu-utils   # the VMM that runs here (TCG) and qcow2 tooling
  debootstrap busybox-static cpio kmod e2fsprogs   # guest image builder
  nftables iproute2       # network slots
  xfsprogs btrfs-progs    # reflink-capable filesystems for copy-on-write tests
  dmsetup                 # dm-snapshot root disks (hosts whose kernel has device-mapper)
  zstd socat
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# The image builder asks apt for the guest kernel package; a machine with empty package lists knows none.
if [ "$(id -u)" -eq 0 ] && ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  apt-get update -qq
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "wrenbox needs these Debian packages; run as root or install them: ${missing[*]}" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
