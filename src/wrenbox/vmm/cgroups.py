"""A cgroup per sandbox VMM: CPU, memory, process and (best effort) I/O limits from the sandbox's size.

What is limited, and why: a guest drives its VMM (QEMU under TCG: a JIT with a translation cache of up
to 1 GiB, device emulation threads, disk I/O). Without limits one sandbox can take every host CPU, grow
QEMU's memory until the host OOM killer picks a victim (any tenant, or wrenbox), start threads until the
host's pid space is gone, or saturate the disk. Each VMM therefore runs in its own cgroup:

- **cpu**: ``(vcpus + vmm_cpus) x 100 ms`` of CPU time per 100 ms period (``cpu.max`` /
  ``cpu.cfs_quota_us``): the VMM's own threads get ``vmm_cpus`` beside the vCPUs; a burst of one unused
  quota;
- **memory**: guest RAM plus an allowance for QEMU itself (``memory_overhead_mib``, which must cover
  the TCG translation cache, see ``-accel tcg,tb-size=``); over it, the kernel OOM-kills inside the
  group, so only the offending VMM dies (``memory.max`` / ``memory.limit_in_bytes``). Measured here
  (TCG boot of the minimal image to its agent, 512 MiB guest): QEMU's own anonymous memory is ~130 MiB
  with the default translation cache, which can grow to 1 GiB, and ~100 MiB with ``tb-size=64``; so
  the default 256 MiB allowance needs ``tb-size`` of at most ~128 MiB. Swap is not limited;
- **pids**: QEMU's threads (``pids.max``), so a guest cannot make its VMM exhaust host pids;
- **io** (optional, best effort): read/write bytes per second on the disk holding the data dir
  (``io.max`` / ``blkio.throttle.*``). Skipped, with a log line, where the controller or a throttlable
  whole-disk device is missing. v1's throttle sees direct and read I/O only: buffered writes are
  written back by the kernel, outside the group.

Guest RAM and memory.max: guest RAM is a shared mapping of a file on tmpfs. A tmpfs page is charged to
the cgroup of the task that *allocates* it, once, and stays charged there while the file holds it;
mapping it later (QEMU) charges nothing. So a RAM file the manager filled before QEMU starts (a restore
copies the snapshot in) is charged to the manager's cgroup, and a VM restoring from a full RAM file
cannot be OOM-killed by its own limit for it. Pages the guest touches for the first time (a fresh boot,
or holes of a sparse RAM file) are charged to the VMM's group: that is why memory.max is the full guest
RAM plus the overhead. Consequences: ``memory_bytes()`` under-reports a restored VM (its pre-filled
pages are the manager's), pages stay charged after QEMU exits until the RAM file is deleted, and the
manager's own cgroup must leave room for the RAM files it writes. Verified on this host's kernel by
``tests/vmm/test_cgroups.py::test_restore_from_full_ram_file_is_not_charged``.

Where: under the cgroup this process is in (``/proc/self/cgroup``), in a child named ``group``
(``wrenbox``), one grandchild per sandbox; whoever limited us stays our ancestor, so sandboxes never
escape limits put on wrenbox. Both hierarchies:

- **cgroup v2** (``/sys/fs/cgroup`` with ``cgroup.controllers``): one directory per sandbox. Controllers
  are enabled in ``cgroup.subtree_control`` of our cgroup and of ``group``. v2's "no internal
  processes" rule forbids that while our own cgroup holds processes, so (as a systemd service with
  ``Delegate=yes`` must) its processes first move into a leaf ``<group>-manager`` beside ``group``.
  The root cgroup is exempt. A later discovery from inside that leaf finds the same tree.
- **cgroup v1** (controllers mounted separately, e.g. ``/sys/fs/cgroup/{cpu,memory,pids,blkio}``):
  one directory per sandbox in each hierarchy, each under our own cgroup *of that hierarchy*.

Discovery: :func:`find_hierarchy` changes nothing (for ``wrenbox doctor``); :meth:`CgroupTree.discover`
also makes our group (and, in v2, enables the controllers). Both raise Unsupported with the reason for
each version where neither can be used, so the product can say why and run VMMs without.

Joining: the VMM's launcher (a stdlib-only script, run as root before it drops to the sandbox's uid and
execs the VMM) writes ``0`` into every file of :attr:`Cgroup.procs_files`. The groups are never handed to
that uid: a VMM must not be able to raise its own limits.

Everything here is a few small writes to cgroupfs and safe to call from async code, except
:meth:`Cgroup.remove` and :meth:`CgroupTree.reclaim`, which may wait (run them in a worker thread).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from wrenbox.errors import InUse, InvalidArgument, NotFound, Unavailable, Unsupported
from wrenbox.names import validate_name
from wrenbox.rollback import Rollback

__all__ = [
    "CPU_PERIOD_US",
    "Cgroup",
    "CgroupConfig",
    "CgroupLimits",
    "CgroupTree",
    "Hierarchy",
    "IoLimit",
    "find_hierarchy",
    "whole_disk_of",
]

log = logging.getLogger(__name__)

CPU_PERIOD_US = 100_000
REQUIRED = ("cpu", "memory", "pids")
V1_OPTIONAL = ("blkio",)
V2_OPTIONAL = ("io",)
_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class CgroupConfig:
    """Settings of the per-sandbox cgroups (``[cgroups]`` in the settings file).

    ``mode``: ``auto`` confines VMMs where the host allows and runs them without otherwise (``wrenbox
    doctor`` says why); ``required`` refuses to start VMMs without; ``off`` never creates cgroups.
    ``group`` names our child cgroup; two wrenbox instances in the same cgroup need different ones.
    ``memory_overhead_mib`` is what QEMU may use beyond guest RAM (its own heap, device buffers, the
    TCG translation cache). ``vmm_cpus`` is CPU time for QEMU's own threads beyond the vCPUs (device
    emulation and I/O run beside a busy vCPU; at exactly ``vcpus`` a start is throttled, measured here
    at +7 to +18 % on create and resume). ``io_read_bps``/``io_write_bps`` throttle the data dir's disk
    (None: not).
    """

    mode: Literal["auto", "required", "off"] = "auto"
    group: str = "wrenbox"
    memory_overhead_mib: int = 256
    vmm_cpus: float = 1.0
    pids_max: int = 256
    io_read_bps: int | None = None
    io_write_bps: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "required", "off"):
            raise InvalidArgument(f"cgroups.mode {self.mode!r}: expected 'auto', 'required' or 'off'")
        validate_name(self.group, what="cgroups.group")
        _positive("cgroups.memory_overhead_mib", self.memory_overhead_mib, minimum=16)
        if not 0 <= self.vmm_cpus <= 64:
            raise InvalidArgument(f"cgroups.vmm_cpus must be between 0 and 64, not {self.vmm_cpus!r}")
        _positive("cgroups.pids_max", self.pids_max, minimum=16)
        for name in ("io_read_bps", "io_write_bps"):
            if getattr(self, name) is not None:
                _positive(f"cgroups.{name}", getattr(self, name))


def _positive(what: str, value: object, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidArgument(f"{what} must be an integer >= {minimum}, not {value!r}")


@dataclass(frozen=True, slots=True)
class IoLimit:
    """Bytes per second on one whole disk (``MAJ:MIN``); None leaves that direction unlimited."""

    device: str
    read_bps: int | None = None
    write_bps: int | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"\d+:\d+", self.device):
            raise InvalidArgument(f"invalid block device {self.device!r}: expected MAJOR:MINOR")


@dataclass(frozen=True, slots=True)
class CgroupLimits:
    cpu_quota_us: int
    memory_bytes: int
    pids_max: int
    cpu_period_us: int = CPU_PERIOD_US
    io: IoLimit | None = None

    def __post_init__(self) -> None:
        _positive("cpu quota", self.cpu_quota_us, minimum=1000)
        _positive("cpu period", self.cpu_period_us, minimum=1000)
        _positive("memory limit", self.memory_bytes, minimum=_MIB)
        _positive("pids limit", self.pids_max)

    @classmethod
    def for_sandbox(
        cls, *, vcpus: int, memory_mib: int, config: CgroupConfig, io_device: str | None = None
    ) -> CgroupLimits:
        """The limits of a sandbox of ``vcpus`` and ``memory_mib`` of guest RAM; ``io_device`` is the
        whole disk under the data dir (:func:`whole_disk_of`), throttled if the config says so."""
        _positive("vcpus", vcpus)
        _positive("memory_mib", memory_mib)
        throttled = config.io_read_bps is not None or config.io_write_bps is not None
        return cls(
            cpu_quota_us=round((vcpus + config.vmm_cpus) * CPU_PERIOD_US),
            memory_bytes=(memory_mib + config.memory_overhead_mib) * _MIB,
            pids_max=config.pids_max,
            io=IoLimit(io_device, config.io_read_bps, config.io_write_bps)
            if io_device and throttled
            else None,
        )


def whole_disk_of(path: Path) -> str | None:
    """``MAJ:MIN`` of the whole disk holding ``path``, or None where it is not on a block device
    (tmpfs, overlayfs, network file systems). Throttles refuse partitions, hence the parent disk."""
    dev = path.stat().st_dev
    sysdir = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not sysdir.exists():
        return None
    if (sysdir / "partition").exists():
        return (sysdir.resolve().parent / "dev").read_text().strip()
    return f"{os.major(dev)}:{os.minor(dev)}"


# Unused quota saved up to one more quota's worth: a VMM whose I/O thread wakes while its vCPU is busy
# is not throttled for the rest of the period (measured here: ~6 % of periods throttled without), and
# over time it still gets ``vcpus`` CPUs.
BURST_FILES = ("cpu.max.burst", "cpu.cfs_burst_us")


def limit_files(version: int, limits: CgroupLimits) -> list[tuple[str, str, str]]:
    """(controller, file, value) to write for ``limits`` in a cgroup of this version."""
    io = limits.io
    if version == 2:
        files = [
            ("cpu", "cpu.max", f"{limits.cpu_quota_us} {limits.cpu_period_us}"),
            ("cpu", "cpu.max.burst", str(limits.cpu_quota_us)),
            ("memory", "memory.max", str(limits.memory_bytes)),
            ("pids", "pids.max", str(limits.pids_max)),
        ]
        if io:
            rates = f"rbps={io.read_bps or 'max'} wbps={io.write_bps or 'max'}"
            files.append(("io", "io.max", f"{io.device} {rates}"))
        return files
    files = [
        # The period first: a quota is checked against the period in force.
        ("cpu", "cpu.cfs_period_us", str(limits.cpu_period_us)),
        ("cpu", "cpu.cfs_quota_us", str(limits.cpu_quota_us)),
        ("cpu", "cpu.cfs_burst_us", str(limits.cpu_quota_us)),
        ("memory", "memory.limit_in_bytes", str(limits.memory_bytes)),
        ("pids", "pids.max", str(limits.pids_max)),
    ]
    if io:  # v1: a rate of 0 removes the device's rule
        files.append(("blkio", "blkio.throttle.read_bps_device", f"{io.device} {io.read_bps or 0}"))
        files.append(("blkio", "blkio.throttle.write_bps_device", f"{io.device} {io.write_bps or 0}"))
    return files


@dataclass(frozen=True)
class Cgroup:
    """One sandbox's cgroup: a directory per hierarchy (v1) or one directory (v2)."""

    name: str
    version: int
    dirs: tuple[Path, ...]
    controllers: Mapping[str, Path]  # controller -> the directory whose files set it

    @property
    def procs_files(self) -> list[Path]:
        """Write ``0`` into each of these to move the writing process (all its threads) in."""
        return [d / "cgroup.procs" for d in self.dirs]

    def pids(self) -> list[int]:
        """Processes in the group, in any of its hierarchies."""
        found: set[int] = set()
        for path in self.procs_files:
            try:
                found.update(int(line) for line in path.read_text().split())
            except FileNotFoundError:
                continue
        return sorted(found)

    def memory_bytes(self) -> int:
        """Memory charged to the group now (see the module docstring for what is not)."""
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        return int(self._file("memory", name).read_text())

    def memory_limit_bytes(self) -> int:
        """The group's memory limit as the kernel holds it (``memory.max`` / ``memory.limit_in_bytes``)."""
        name = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        return int(self._file("memory", name).read_text())

    def memory_peak_bytes(self) -> int | None:
        """The most memory ever charged to the group (None on v2 kernels before 5.19: no ``memory.peak``)."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int(self._file("memory", name).read_text())
        except FileNotFoundError:
            return None

    def oom_kills(self) -> int:
        """How many processes the kernel killed in this group for exceeding its memory limit."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in self._file("memory", name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def apply(self, limits: CgroupLimits) -> None:
        """Write ``limits`` for the controllers this group has (a tree is only made with the required
        ones); io is best effort: skipped, with a warning, where the device cannot be throttled."""
        for controller, name, value in limit_files(self.version, limits):
            where = self.controllers.get(controller)
            if where is None:
                log.info("cgroup %s: no %s controller here, %s not set", self.name, controller, name)
            elif name in BURST_FILES and not (where / name).exists():
                continue  # kernels before 5.14: no bursts, the quota alone
            elif controller in V1_OPTIONAL + V2_OPTIONAL:
                try:
                    (where / name).write_text(value)
                except OSError as exc:  # ENODEV / EINVAL: the device cannot be throttled
                    log.warning("cgroup %s: cannot set %s to %r (%s)", self.name, name, value, exc)
            else:
                _write(where / name, value)

    def remove(self, timeout: float = 2.0) -> None:
        """Remove the group. It kills nothing: the caller ends the VMM first. Processes still in it after
        ``timeout`` seconds (one being killed needs a moment to leave) raise InUse. Missing is fine."""
        deadline = time.monotonic() + timeout
        while (left := self.pids()) and time.monotonic() < deadline:
            time.sleep(0.02)
        if left:
            raise InUse(f"cgroup {self.name} still holds processes {left}; end them before removing it")
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno == errno.EBUSY:  # a process joined after we looked
                    raise InUse(f"cgroup {d} is in use: {self.pids()}") from exc
                raise Unavailable(f"cannot remove cgroup {d}: {exc.strerror}") from exc

    def _file(self, controller: str, name: str) -> Path:
        where = self.controllers.get(controller)
        if where is None:
            raise Unsupported(f"cgroup {self.name} has no {controller} controller")
        return where / name


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise Unavailable(f"cannot set {path} to {value!r}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class CgroupTree:
    """Our parent cgroup(s) on this host: where sandbox groups are made, found and removed."""

    version: int
    dirs: tuple[Path, ...]  # our ``group`` directory in each hierarchy
    controllers: Mapping[str, Path]  # controller -> our ``group`` directory in its hierarchy

    @classmethod
    def discover(cls, group: str = "wrenbox", *, proc: Path = Path("/proc/self")) -> CgroupTree:
        """Find the host's cgroups (:func:`find_hierarchy`) and set up our ``group`` in them."""
        validate_name(group, what="cgroup group")
        found = find_hierarchy(proc=proc)
        if found.version == 2:
            return cls.v2(found.own["cpu"], group)
        return cls.v1(found.own, group)

    @classmethod
    def v2(
        cls,
        own: Path,
        group: str,
        *,
        required: Iterable[str] = REQUIRED,
        optional: Iterable[str] = V2_OPTIONAL,
    ) -> CgroupTree:
        """Our ``group`` under ``own``, our cgroup v2 directory, with ``required`` (and whichever of
        ``optional`` are available) enabled for the sandbox groups."""
        validate_name(group, what="cgroup group")
        leaf = f"{group}-manager"
        if own.name == leaf and (own.parent / group).is_dir():
            own = own.parent  # we are the manager moved into its leaf by an earlier discovery
        available = set((own / "cgroup.controllers").read_text().split())
        required = list(required)
        missing = [c for c in required if c not in available]
        if missing:
            raise Unsupported(
                f"cgroup v2 at {own} lacks {', '.join(missing)} (not delegated to this process's cgroup; "
                "under systemd set Delegate=yes)"
            )
        wanted = required + [c for c in optional if c in available]
        parent = own / group
        _mkdir(parent)
        if wanted:
            _delegate(own, leaf, wanted)
            _enable(parent, wanted)
        return cls(2, (parent,), dict.fromkeys(wanted, parent))

    @classmethod
    def v1(cls, own: Mapping[str, Path], group: str) -> CgroupTree:
        """Our ``group`` under ``own`` (controller -> our cgroup v1 directory of its hierarchy)."""
        validate_name(group, what="cgroup group")
        controllers = {c: d / group for c, d in own.items()}
        for d in controllers.values():
            _mkdir(d)
        return cls(1, tuple(dict.fromkeys(controllers.values())), controllers)

    def create(self, name: str, limits: CgroupLimits) -> Cgroup:
        """Make (or reuse) the group ``name`` and (re)apply ``limits``. A new group that cannot be set
        up is removed again."""
        cg = self._group(name)
        with Rollback(f"cgroup {name}") as rb:
            for d in cg.dirs:
                try:
                    d.mkdir()
                    rb.push(f"cgroup {d}", d.rmdir)
                except FileExistsError:
                    continue
                except OSError as exc:
                    raise Unavailable(f"cannot create cgroup {d}: {exc.strerror}") from exc
            cg.apply(limits)
            rb.commit()
        return cg

    def get(self, name: str) -> Cgroup:
        """The existing group ``name`` (NotFound if it is in none of our hierarchies)."""
        cg = self._group(name)
        if not any(d.is_dir() for d in cg.dirs):
            raise NotFound(f"no cgroup {name!r} under {', '.join(map(str, self.dirs))}")
        return cg

    def holding(self, pid: int) -> Cgroup | None:
        """The group process ``pid`` runs in, if it is one of ours."""
        return next((cg for cg in map(self.get, self.names()) if pid in cg.pids()), None)

    def names(self) -> list[str]:
        """Groups that exist, in any hierarchy (a half-made one counts: it is ours to reclaim)."""
        found = {p.name for d in self.dirs if d.is_dir() for p in d.iterdir() if p.is_dir()}
        return sorted(found)

    def reclaim(self, keep: Iterable[str]) -> list[str]:
        """Remove every group not in ``keep`` (for the leak sweep, after it ended stray VMMs). A group
        that still holds processes a moment after (a VMM's helper leaves once its VMM has ended) is left,
        with a warning: this kills nothing."""
        kept = set(keep)
        removed = []
        for name in self.names():
            if name in kept:
                continue
            try:
                self.get(name).remove()
                removed.append(name)
            except InUse as exc:
                log.warning("leaving %s", exc)
        return removed

    def _group(self, name: str) -> Cgroup:
        validate_name(name, what="cgroup name")
        return Cgroup(
            name,
            self.version,
            tuple(d / name for d in self.dirs),
            {c: d / name for c, d in self.controllers.items()},
        )


# --- discovery ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Mount:
    root: str  # the path inside the hierarchy that is mounted
    point: Path
    fstype: str
    options: frozenset[str]


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _mounts(mountinfo: str) -> list[_Mount]:
    """The cgroup and cgroup2 mounts of ``/proc/<pid>/mountinfo``."""
    found = []
    for line in mountinfo.splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        found.append(
            _Mount(_unescape(fields[3]), Path(_unescape(fields[4])), tail[0], frozenset(tail[2].split(",")))
        )
    return found


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """Controller -> our path in its hierarchy, from ``/proc/<pid>/cgroup``; ``""`` is cgroup v2's."""
    own = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    return own


def _dir_in(mount: _Mount, path: str) -> Path | None:
    """Where the hierarchy path ``path`` is reachable through ``mount`` (None: outside what it shows)."""
    root = mount.root.rstrip("/")
    if path != mount.root and not path.startswith(root + "/"):
        return None
    return mount.point / path[len(root) :].lstrip("/")


@dataclass(frozen=True)
class Hierarchy:
    """The cgroups this process is in, as found (nothing changed): v2 when its cgroup offers cpu, memory
    and pids, else v1. ``own`` maps each usable controller to our cgroup's directory (in v2 the same
    for all)."""

    version: int
    own: Mapping[str, Path]

    def __str__(self) -> str:
        if self.version == 2:
            return f"cgroup v2 at {self.own['cpu']} ({', '.join(self.own)})"
        return "cgroup v1: " + ", ".join(f"{c} at {d}" for c, d in self.own.items())


def find_hierarchy(*, proc: Path = Path("/proc/self")) -> Hierarchy:
    """Where per-sandbox cgroups would go, changing nothing (what ``wrenbox doctor`` reports).
    Unsupported, with the reason for each version, where neither can be used."""
    mounts = _mounts((proc / "mountinfo").read_text())
    own = _own_paths((proc / "cgroup").read_text())
    reasons = []
    for find in (_find_v2, _find_v1):
        try:
            found = find(mounts, own)
        except Unsupported as exc:
            reasons.append(exc.message)
            continue
        for d in set(found.own.values()):
            if not os.access(d, os.W_OK):  # also EROFS
                reasons.append(f"cannot create cgroups in {d}: not writable (needs root or delegation)")
                break
        else:
            return found
    raise Unsupported("cannot confine VMMs in cgroups: " + "; ".join(reasons))


def _find_v2(mounts: list[_Mount], own: dict[str, str]) -> Hierarchy:
    if "" not in own:
        raise Unsupported("no cgroup v2 hierarchy for this process")
    for mount in mounts:
        where = _dir_in(mount, own[""]) if mount.fstype == "cgroup2" else None
        if where is None or not where.is_dir():
            continue
        available = (where / "cgroup.controllers").read_text().split()
        missing = [c for c in REQUIRED if c not in available]
        if missing:
            raise Unsupported(f"cgroup v2 at {where} lacks {', '.join(missing)}")
        return Hierarchy(2, {c: where for c in REQUIRED + V2_OPTIONAL if c in available})
    raise Unsupported(f"cgroup v2 path {own['']} is not mounted here")


def _find_v1(mounts: list[_Mount], own: dict[str, str]) -> Hierarchy:
    dirs: dict[str, Path] = {}
    for controller in REQUIRED + V1_OPTIONAL:
        for mount in mounts:
            if mount.fstype != "cgroup" or controller not in mount.options or controller not in own:
                continue
            where = _dir_in(mount, own[controller])
            if where is not None and where.is_dir():
                dirs[controller] = where
                break
    missing = [c for c in REQUIRED if c not in dirs]
    if missing:
        raise Unsupported(f"cgroup v1 lacks {', '.join(missing)} (not mounted, or our cgroup not visible)")
    return Hierarchy(1, dirs)


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise Unsupported(
            f"cannot create cgroup {path}: {exc.strerror} (wrenbox needs root or a cgroup delegated to it)"
        ) from exc


def _enable(cgroup: Path, controllers: list[str]) -> None:
    """Enable ``controllers`` for the children of ``cgroup`` (one write: all or nothing)."""
    control = cgroup / "cgroup.subtree_control"
    if set(controllers) <= set(control.read_text().split()):
        return
    try:
        control.write_text(" ".join(f"+{c}" for c in controllers))
    except OSError as exc:
        raise Unsupported(f"cannot enable {', '.join(controllers)} in {control}: {exc.strerror}") from exc


def _delegate(own: Path, leaf: str, controllers: list[str]) -> None:
    """Enable ``controllers`` below our own cgroup, first moving its processes into ``leaf``: a v2
    cgroup with processes cannot hand domain controllers to children (the root is exempt)."""
    if set(controllers) <= set((own / "cgroup.subtree_control").read_text().split()):
        return
    if not (own / "cgroup.type").exists():  # only the root cgroup has no type
        _enable(own, controllers)
        return
    _mkdir(own / leaf)
    for pid in (own / "cgroup.procs").read_text().split():
        try:
            (own / leaf / "cgroup.procs").write_text(pid)
        except ProcessLookupError:  # it exited meanwhile
            continue
        except OSError as exc:
            raise Unsupported(
                f"cannot move process {pid} out of {own} into {own / leaf} ({exc.strerror}); "
                f"v2 only delegates controllers from a cgroup without processes"
            ) from exc
    _enable(own, controllers)
