# ruff: noqa: PTH103, PTH112, PTH120, PTH211
# (plain str paths and os calls: this runs with -I -S, next to raw syscalls)
"""Put this process in a VMM's jail, then become the VMM: ``python -I -S enter_jail.py SPEC -- ARGV...``.

Run as root by :mod:`wrenbox.vmm.jail` (through ``posix_spawn``: nothing of the manager runs between
fork and exec, so the work happens here, in a fresh interpreter). In order, while still root:

1. join the VM's cgroups (``"0"`` into each ``cgroup.procs``);
2. enter the VM's network namespace and open its tap (so the VMM never needs CAP_NET_ADMIN);
3. open the files handed over as descriptors, refusing symlinks (guest RAM lives under /dev/shm), and
   start the console keeper: ``tail -c N`` as the VM's user, reading a pipe QEMU logs its console to and
   writing the last N bytes to a file when QEMU is gone (a panicking guest's last words, in bounded space);
4. build a private mount namespace whose root is an empty tmpfs holding only the host's programs and
   libraries (read-only), a few device nodes, a fresh /proc and the VM's own files, then ``pivot_root``;
5. drop to the VM's own uid and gid with no supplementary groups, set no_new_privs and ``RLIMIT_CORE`` 0;
6. ``execve`` the VMM with the minimal environment in the spec.

Stdlib only, on purpose: it runs with ``-I -S`` (no site packages, no environment), small and auditable.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import resource
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 0x2
PR_SET_NO_NEW_PRIVS = 38
SYS_PIVOT_ROOT = 155  # x86_64
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if v is None else v.encode() for v in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    return fd


def _place(fd: int, target: int) -> None:
    if fd != target:
        os.dup2(fd, target)  # dup2's copy is inheritable
        os.close(fd)
    else:
        os.set_inheritable(fd, True)


def _bind(root: str, path: str, *, writable: bool) -> None:
    inside = root + path
    if os.path.isdir(path):
        os.makedirs(inside, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(inside), exist_ok=True)
        open(inside, "a").close()  # a mount point
    _mount(path, inside, None, MS_BIND | MS_REC)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | (0 if writable else MS_RDONLY)
    if not path.startswith("/dev/"):
        flags |= MS_NODEV
    _mount(None, inside, None, flags)


def _become(uid: int, gid: int) -> None:
    """The VM's user and group alone, for good (real, effective and saved ids; no supplementary groups)."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _keep_console(console: dict, uid: int, gid: int) -> None:
    out = os.open(
        console["path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    read_end, write_end = os.pipe()  # both close on exec
    if os.fork() == 0:
        try:
            os.dup2(read_end, 0)
            os.dup2(out, 1)
            _become(uid, gid)
            os.execv("/usr/bin/tail", ["tail", "-c", str(console["keep"])])
        finally:
            os._exit(127)
    os.close(read_end)
    os.close(out)
    os.fchown(write_end, uid, gid)  # QEMU, as that user, opens it again through /proc/self/fd
    _place(write_end, int(console["fd"]))


def _build_root(spec: dict) -> None:
    root = spec["root"]
    private = os.umask(0o022)  # the skeleton's directories must be traversable by the VMM's user
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    _mount("wrenbox-jail", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in spec["read"]:
        _bind(root, path, writable=False)
    for path in spec["write"]:
        _bind(root, path, writable=True)
    for link, target in spec.get("links", {}).items():
        os.symlink(target, root + link)
    os.makedirs(root + "/proc", exist_ok=True)
    # Its own processes only: other VMMs' and the manager's stay invisible.
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")  # old root stacks under the new one
    _check(_libc.umount2(b".", MNT_DETACH), "detach the host's root")
    os.chdir("/")
    os.umask(private)


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    vmm = argv[3:]
    for procs in spec.get("cgroups", []):
        with open(procs, "w") as f:
            f.write("0")
    if spec.get("netns"):
        ns = os.open(spec["netns"], os.O_RDONLY | os.O_CLOEXEC)
        _check(_libc.setns(ns, CLONE_NEWNET), f"setns {spec['netns']}")
        os.close(ns)
    for target, tap in spec.get("taps", {}).items():
        _place(_open_tap(tap), int(target))
    for target, path in spec.get("files", {}).items():
        _place(os.open(path, os.O_RDWR | os.O_NOFOLLOW), int(target))
    if spec.get("console"):
        _keep_console(spec["console"], spec["uid"], spec["gid"])
    _build_root(spec)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _become(spec["uid"], spec["gid"])
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    os.execve(vmm[0], vmm, spec["env"])


if __name__ == "__main__":
    try:
        main(sys.argv)
    except Exception as exc:  # the one message the manager reads in the VMM's log
        print(f"wrenbox jail: {exc}", file=sys.stderr, flush=True)
        sys.exit(126)
