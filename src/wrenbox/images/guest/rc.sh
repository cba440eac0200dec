#!/usr/local/bin/busybox sh
# sysinit script of busybox init (PID 1), run by busybox sh. Busybox runs its own applets (mount, ip, od,
# ...) without exec'ing anything; every exec of a dynamically linked program costs ~60 ms under TCG.
# Network, DNS and hostname come from the kernel command line (wrenbox.ip=, wrenbox.gw=, wrenbox.dns=,
# wrenbox.hostname=, wrenbox.mtu=): the host decides them, the image does not hard-code them.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup

root=/dev/vda ip= gw= dns= mtu= name=sandbox
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        wrenbox.root=*) root=${arg#*=} ;;
        wrenbox.ip=*) ip=${arg#*=} ;;
        wrenbox.gw=*) gw=${arg#*=} ;;
        wrenbox.dns=*) dns=${arg#*=} ;;
        wrenbox.mtu=*) mtu=${arg#*=} ;;
        wrenbox.hostname=*) name=${arg#*=} ;;
    esac
done

hostname "$name"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$name" > /etc/hosts
ip link set lo up
if [ -n "$ip" ]; then
    ip addr add "$ip" dev eth0
    [ -n "$mtu" ] && ip link set eth0 mtu "$mtu"
    ip link set eth0 up
    [ -n "$gw" ] && ip route add default via "$gw"
fi
: > /etc/resolv.conf
for server in $(echo "$dns" | tr , ' '); do
    echo "nameserver $server" >> /etc/resolv.conf
done

# The sandbox's disk may be larger than the image's filesystem: grow it online (ext4 superblock at byte
# 1024: blocks count at +4, log2(block size) - 10 at +24).
grow_root() {
    read -r sectors < "/sys/class/block/${root#/dev/}/size" || return
    set -- $(od -An -t u4 -j 1028 -N 4 "$root") $(od -An -t u4 -j 1048 -N 4 "$root")
    fs_bytes=$(($1 * (1024 << $2)))
    if [ $((sectors * 512 - fs_bytes)) -ge 1048576 ]; then
        resize2fs "$root" > /dev/console 2>&1
    fi
}
grow_root

read -r uptime _ < /proc/uptime
echo "WRENBOX-RC-DONE uptime=$uptime ip=$ip gw=$gw" > /dev/console
