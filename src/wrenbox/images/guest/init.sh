#!/bin/sh
# /init of the initramfs (busybox sh, PID 1): load the modules the root disk needs, mount the disk
# read-write and hand over to busybox init on it. Each sandbox gets its own copy-on-write disk, so the
# root is writable and its state is captured together with the VM's memory.
# On failure it exits: the kernel panics, and with panic=-1 the VM stops instead of hanging.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r module; do
    insmod "/lib/modules/$module" || echo "wrenbox-init: insmod $module failed"
done < /lib/modules/load.order

root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        wrenbox.root=*) root=${arg#wrenbox.root=} ;;
    esac
done

# virtio-blk probes asynchronously; the device normally shows up on the first look.
tries=0
while [ ! -b "$root" ] && [ "$tries" -lt 500 ]; do
    sleep 0.01
    tries=$((tries + 1))
done
if [ ! -b "$root" ]; then
    echo "WRENBOX-INIT-FAILED no root device $root"
    exit 1
fi
if ! mount -t ext4 -o rw "$root" /newroot; then
    echo "WRENBOX-INIT-FAILED cannot mount $root"
    exit 1
fi

read -r uptime _ < /proc/uptime
echo "WRENBOX-INITRAMFS-DONE uptime=$uptime"
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
