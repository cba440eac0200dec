"""The VMM's confinement: each VM's QEMU runs as a user of its own, in a root of its own, in its cgroups.

Under TCG a guest drives a large emulator (the translator, virtio devices, ACPI, the serial port) and on
every restore QEMU replays device state the guest shaped. A memory-safety bug anywhere there must give
the attacker an unprivileged process that sees nothing of the host, not root. So, per VM:

- **uid**: ``uid_base + slot index`` (unique while the VM runs; no passwd entry needed) and the shared
  ``gid``. The VM's own files (its run directory, RAM file, disk) are chowned to that uid; what it only
  reads (a template's base disk, the kernel) is made readable by ``gid`` (mode 0440/0640, owner root).
  The gid reads nothing else: it sees no other files (next point).
- **root**: a private mount namespace whose root is an empty tmpfs with ``/usr`` (programs, libraries,
  firmware) and ``/etc/ld.so.cache`` read-only, a few device nodes, its own ``/proc`` (its processes
  only), and the VM's files at their usual paths. The data directory, other sandboxes, ``state.db`` and
  other templates do not exist there.
- **descriptors**: the tap is opened by the launcher (no CAP_NET_ADMIN, no tap ownership to manage);
  guest RAM, which lives under world-writable ``/dev/shm``, is opened without following symlinks and
  handed over as ``/proc/self/fd/N``.
- **seccomp**: QEMU's own ``-sandbox`` policy (see :mod:`wrenbox.vmm.qemu`), no new privileges, no core
  dumps, an environment of ``PATH`` only.
- **cgroups**: the launcher joins the VM's cgroups before anything else (see :mod:`wrenbox.vmm.cgroups`).

The work between fork and exec runs in :mod:`wrenbox.vmm.enter_jail` (a stdlib-only script), because
wrenbox starts VMMs with ``posix_spawn``.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from wrenbox.errors import InvalidArgument
from wrenbox.vmm.cgroups import Cgroup

__all__ = ["ENTER_JAIL", "Confinement", "Console", "JailSpec", "grant_read", "own"]

ENTER_JAIL = Path(__file__).with_name("enter_jail.py")
_SYSTEM_READ = ("/usr", "/etc/ld.so.cache")
_SYSTEM_LINKS = {"/bin": "usr/bin", "/lib": "usr/lib", "/lib64": "usr/lib64", "/sbin": "usr/sbin"}
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_MAX_ID = 2**32 - 2


@dataclass(frozen=True, slots=True)
class Confinement:
    """Who one VM's VMM runs as and the cgroup it joins (removed when the VMM is gone)."""

    uid: int
    gid: int
    cgroup: Cgroup | None = None

    def __post_init__(self) -> None:
        for name in ("uid", "gid"):
            value = getattr(self, name)
            if not 0 < value <= _MAX_ID:
                raise InvalidArgument(f"a VMM's {name} must be a non-root id, got {value}")


@dataclass(frozen=True, slots=True)
class Console:
    """Where the VMM logs its console (descriptor ``fd``) and where the last ``keep`` bytes of it are
    written once the VMM is gone."""

    fd: int
    path: Path
    keep: int


@dataclass(slots=True)
class JailSpec:
    """What :mod:`wrenbox.vmm.enter_jail` builds for one VMM. Paths are host paths, shown at the same
    place inside; ``files`` and ``taps`` map descriptor numbers to what is opened there."""

    confinement: Confinement
    root: Path
    netns: Path | None = None
    read: list[Path] = field(default_factory=list)
    write: list[Path] = field(default_factory=list)
    files: dict[int, Path] = field(default_factory=dict)
    taps: dict[int, str] = field(default_factory=dict)
    console: Console | None = None
    devices: tuple[str, ...] = _DEVICES

    def _cgroup_procs(self) -> list[Path]:
        cgroup = self.confinement.cgroup
        return cgroup.procs_files if cgroup is not None else []

    def argv(self, vmm: list[str]) -> list[str]:
        """The command line that confines, then runs ``vmm``."""
        spec = {
            "uid": self.confinement.uid,
            "gid": self.confinement.gid,
            "cgroups": [str(p) for p in self._cgroup_procs()],
            "root": str(self.root),
            "netns": str(self.netns) if self.netns else None,
            "read": [*_SYSTEM_READ, *(str(p) for p in self.read)],
            "write": [*(d for d in self.devices if Path(d).exists()), *(str(p) for p in self.write)],
            "links": _SYSTEM_LINKS,
            "files": {str(fd): str(p) for fd, p in self.files.items()},
            "taps": {str(fd): tap for fd, tap in self.taps.items()},
            "console": None
            if self.console is None
            else {"fd": self.console.fd, "path": str(self.console.path), "keep": self.console.keep},
            "env": {"PATH": "/usr/bin:/bin"},
        }
        return [sys.executable, "-I", "-S", str(ENTER_JAIL), json.dumps(spec), "--", *vmm]


def own(path: Path, confinement: Confinement) -> None:
    """Make a VM's own file or directory its VMM's (mode kept: 0600/0700 under wrenbox's umask)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise InvalidArgument(f"{path} is a symlink; a VM's files are never links")
    if (st.st_uid, st.st_gid) != (confinement.uid, confinement.gid):
        os.lchown(path, confinement.uid, confinement.gid)


def grant_read(path: Path, confinement: Confinement) -> None:
    """Let the VMMs' group read a root-owned file they only read (a base disk, a kernel). Idempotent;
    only group bits are added, so the file stays unreadable to other users."""
    st = path.stat()
    if st.st_gid != confinement.gid and st.st_uid == 0:
        os.chown(path, 0, confinement.gid)
    if not st.st_mode & stat.S_IRGRP:
        path.chmod(stat.S_IMODE(st.st_mode) | stat.S_IRGRP)
