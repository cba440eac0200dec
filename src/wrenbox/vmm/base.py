"""The VMM driver interface: what wrenbox asks of a virtual machine monitor.

A :class:`Driver` makes VMs, either by booting a kernel or by restoring a snapshot; a :class:`Vm` is
the handle on one running VMM process::

    vm = await driver.boot(config)              # or: await driver.restore(config, snapshot)
    await vm.pause()                            # vCPUs stopped, process kept
    snapshot = await vm.snapshot(dest)          # device state (+ memory) into dest, machine pinned
    await vm.destroy()                          # process gone, however it was doing
    vm = await driver.restore(config2, snapshot)

Ownership: everything a VM uses that outlives its process (disk files, the guest RAM file, the run
directory, the network namespace) belongs to the caller, who names it in :class:`VmConfig` and removes it
after :meth:`Vm.destroy`. A driver owns only the VMM process and the files it creates in ``run_dir``.

A snapshot pins the machine it was taken from (:meth:`Machine.pinned` plus what the VMM adds: its
version, accelerator, CPU model). A restore asking for anything else is refused before a process starts,
with the differences named, because a VMM loading device state into a different machine fails late and
obscurely, or worse, succeeds and corrupts the guest.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import xxhash
from pydantic import TypeAdapter, ValidationError

from wrenbox.errors import CorruptData, InvalidArgument, NotFound
from wrenbox.fileio import fsync_path, publish, temp_sibling
from wrenbox.names import validate_name
from wrenbox.pids import ProcessRef
from wrenbox.vmm.jail import Confinement

__all__ = [
    "DiskFormat",
    "Drive",
    "Driver",
    "Kernel",
    "Machine",
    "MemoryFile",
    "Nic",
    "PagedMemory",
    "Snapshot",
    "SnapshotKind",
    "SnapshotMeta",
    "Vm",
    "VmConfig",
]

SnapshotKind = Literal["full", "diff"]


class DiskFormat(StrEnum):
    """How a disk file is laid out; the rootfs backends produce disks in these formats."""

    RAW = "raw"
    QCOW2 = "qcow2"


_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_MAX_VCPUS = 64
_MIN_MEMORY_MIB = 64
SNAPSHOT_META = "snapshot.json"
SNAPSHOT_STATE = "vmstate"


@dataclass(frozen=True, slots=True)
class Drive:
    """A virtio block device backed by a file the caller owns. ``backing``: a file the VMM opens through
    it, read-only (a qcow2 overlay's base image)."""

    path: Path
    format: DiskFormat = DiskFormat.RAW
    read_only: bool = False
    backing: Path | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "format", DiskFormat(self.format))
        except ValueError:
            raise InvalidArgument(f"unknown disk format {self.format!r}; expected 'raw' or 'qcow2'") from None
        object.__setattr__(self, "path", Path(self.path).absolute())


@dataclass(frozen=True, slots=True)
class Nic:
    """A virtio network device with MAC ``mac`` on tap device ``tap`` (inside the VM's network
    namespace). Which MAC and tap a sandbox gets is the network plan's business (the same in every
    sandbox: clones of one snapshot carry the MAC in their device state)."""

    mac: str
    tap: str

    def __post_init__(self) -> None:
        if not isinstance(self.mac, str) or not _MAC.fullmatch(self.mac):
            raise InvalidArgument(f"invalid MAC address {self.mac!r}; expected 6 lowercase hex pairs")
        validate_name(self.tap, what="tap device name")
        if len(self.tap) > 15:  # IFNAMSIZ - 1
            raise InvalidArgument(f"tap device name {self.tap!r} is longer than 15 characters")


@dataclass(frozen=True, slots=True)
class Machine:
    """The virtual hardware. A snapshot pins it: restore must ask for the same (see :meth:`pinned`)."""

    vcpus: int = 1
    memory_mib: int = 512
    drives: tuple[Drive, ...] = ()
    nics: tuple[Nic, ...] = ()
    balloon: bool = True  # virtio-balloon with free page reporting: host RAM follows guest use

    def __post_init__(self) -> None:
        if (
            isinstance(self.vcpus, bool)
            or not isinstance(self.vcpus, int)
            or not 1 <= self.vcpus <= _MAX_VCPUS
        ):
            raise InvalidArgument(f"vcpus must be an integer from 1 to {_MAX_VCPUS}, not {self.vcpus!r}")
        if (
            isinstance(self.memory_mib, bool)
            or not isinstance(self.memory_mib, int)
            or self.memory_mib < _MIN_MEMORY_MIB
            or self.memory_mib % 2
        ):
            raise InvalidArgument(
                f"memory_mib must be an even integer >= {_MIN_MEMORY_MIB}, not {self.memory_mib!r}"
            )
        object.__setattr__(self, "drives", tuple(self.drives))
        object.__setattr__(self, "nics", tuple(self.nics))

    def pinned(self) -> dict[str, Any]:
        """What a snapshot of this machine fixes: everything except host-side file paths and tap names."""
        return {
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "drives": [{"format": str(d.format), "read_only": d.read_only} for d in self.drives],
            "nics": [{"mac": n.mac} for n in self.nics],
            "balloon": self.balloon,
        }


@dataclass(frozen=True, slots=True)
class Kernel:
    """What a cold boot starts. ``cmdline`` holds the image's and the network's arguments; the driver
    adds what the machine needs (console, clock source)."""

    path: Path
    initrd: Path | None = None
    cmdline: str = ""


@dataclass(frozen=True, slots=True)
class MemoryFile:
    """Guest RAM mapped shared from a file the VM owns: guest writes land in it, so after a pause the
    file *is* the memory snapshot (and memory the guest frees becomes holes in it).

    Never map a file that others use (a template's RAM): QEMU 7.2 discards freed guest memory by
    punching holes into the backing file even for a private (``share=off``) mapping, which would change
    the file under every other VM using it. Give each VM its own copy.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).absolute())


@dataclass(frozen=True, slots=True)
class PagedMemory:
    """Guest RAM paged in on demand from a memory snapshot directory (``memfile.header`` and its diffs,
    :mod:`wrenbox.memory`) by wrenbox's UFFD page server: a restore that copies no RAM up front.

    Only for VMMs that keep guest RAM in anonymous memory and accept a userfaultfd hand-off
    (Firecracker's ``Uffd`` memory backend). The VM owns the page server it gets; the directory must
    stay in place until the VM is destroyed.
    """

    snapshot_dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "snapshot_dir", Path(self.snapshot_dir).absolute())


@dataclass(frozen=True, slots=True)
class VmConfig:
    """One VM process: its machine, its RAM, where its sockets and logs go, and how it starts.

    ``kernel`` is needed for a cold boot only (a restore takes everything from the snapshot).
    ``memory`` is where guest RAM lives or, for a restore, comes from; a :class:`PagedMemory` only
    where the driver supports it (Firecracker). ``netns`` is the path of a network namespace
    (``/run/netns/<name>``) the VMM is started in; its tap devices are opened there. ``confinement``:
    the unprivileged user and cgroups the VMM runs as and in (:mod:`wrenbox.vmm.jail`); None runs it
    as the caller.
    """

    machine: Machine
    memory: MemoryFile | PagedMemory
    run_dir: Path
    kernel: Kernel | None = None
    netns: Path | None = None
    confinement: Confinement | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir).absolute())


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """What ``snapshot.json`` records next to the state file. Guest RAM is not in the snapshot
    directory: it stays in the VM's RAM file, which the caller keeps (and passes to the restore).
    ``argv`` is the exact command line the VMM ran, for people; ``pinned`` is what a restore is checked
    against.
    """

    vmm: str
    vmm_version: str
    kind: SnapshotKind
    pinned: dict[str, Any]
    argv: tuple[str, ...]
    state_bytes: int
    created_at: float = field(default_factory=time.time)
    # xxh3-128 of the state file, hex (None in snapshots from before it was recorded): a VMM loading
    # damaged device state may fail obscurely or, worse, run the guest on it.
    state_checksum: str | None = None


_META = TypeAdapter(SnapshotMeta)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A snapshot directory: ``vmstate`` (the VMM's device state) and ``snapshot.json``."""

    dir: Path
    meta: SnapshotMeta

    @property
    def state_path(self) -> Path:
        return self.dir / SNAPSHOT_STATE

    @classmethod
    def load(cls, directory: Path) -> Snapshot:
        """Read a snapshot directory; NotFound if it has none, CorruptData if it does not check out."""
        directory = Path(directory).absolute()
        try:
            raw = (directory / SNAPSHOT_META).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no snapshot in {directory}") from None
        try:
            meta = _META.validate_json(raw)
        except ValidationError as exc:
            raise CorruptData(f"unreadable snapshot metadata in {directory}: {exc}") from exc
        snapshot = cls(directory, meta)
        try:
            size = snapshot.state_path.stat().st_size
        except FileNotFoundError:
            raise CorruptData(f"snapshot {directory} has no {SNAPSHOT_STATE} file") from None
        if size != meta.state_bytes:
            raise CorruptData(
                f"snapshot {directory}: {SNAPSHOT_STATE} has {size} bytes, {meta.state_bytes} were written"
            )
        if meta.state_checksum is not None and _checksum(snapshot.state_path) != meta.state_checksum:
            raise CorruptData(f"snapshot {directory}: {SNAPSHOT_STATE} is damaged (checksum mismatch)")
        return snapshot

    @classmethod
    def save(cls, directory: Path, meta: SnapshotMeta) -> Snapshot:
        """Write ``snapshot.json`` durably (the state file is already complete); it is written last, so a
        directory with metadata always has its whole state file."""
        dest = directory / SNAPSHOT_META
        tmp = temp_sibling(dest)
        try:
            tmp.write_text(json.dumps(asdict(meta), indent=1))
            publish(tmp, dest, replace=True)
        finally:
            tmp.unlink(missing_ok=True)
        return cls(directory, meta)

    def check_restorable(self, vmm: str, vmm_version: str, pinned: dict[str, Any]) -> None:
        """InvalidArgument naming every difference between this snapshot's machine and the one asked for."""
        meta = self.meta
        if meta.vmm != vmm or meta.vmm_version != vmm_version:
            raise InvalidArgument(
                f"snapshot {self.dir} was taken with {meta.vmm} {meta.vmm_version}; this host runs "
                f"{vmm} {vmm_version}, which cannot load it (rebuild the template)"
            )
        differences = [
            f"{key}: snapshot has {meta.pinned.get(key)!r}, restore asked for {pinned.get(key)!r}"
            for key in sorted(meta.pinned.keys() | pinned.keys())
            if meta.pinned.get(key) != pinned.get(key)
        ]
        if differences:
            raise InvalidArgument(
                f"snapshot {self.dir} was taken on a different machine: " + "; ".join(differences)
            )


class Vm(ABC):
    """A running (or paused) VMM process. Methods raise wrenbox errors; ``destroy`` never leaves it running.

    ``timings`` holds the phases of the last start and of each later operation, in seconds (for logs and
    benchmarks: ``spawn``, ``qmp``, ``load``, ``cont``, ``stop``, ``save``, ``quit``, ...).
    """

    config: VmConfig
    process: ProcessRef
    timings: dict[str, float]
    driver: Driver
    argv: list[str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        """True while the VMM process runs (paused or not)."""
        return self.process.alive()

    @abstractmethod
    async def status(self) -> str:
        """The VMM's run state (``running``, ``paused``, ...)."""

    @abstractmethod
    async def pause(self) -> None:
        """Stop the vCPUs; memory and devices stay as they are."""

    @abstractmethod
    async def resume(self) -> None:
        """Continue after :meth:`pause` or :meth:`snapshot`."""

    @abstractmethod
    async def snapshot(self, dest: Path, kind: SnapshotKind = "full") -> Snapshot:
        """Pause (if running) and write a snapshot into the existing directory ``dest``.

        The VM stays paused: :meth:`resume` continues it, :meth:`destroy` ends it.
        """

    @abstractmethod
    async def destroy(self) -> None:
        """End the VMM process: gracefully if it answers, by signal otherwise. Idempotent."""

    @abstractmethod
    async def console_tail(self, max_bytes: int = 4000) -> str:
        """The end of the guest's serial console (for error messages)."""

    async def _seal_snapshot(self, dest: Path, state: Path, kind: SnapshotKind) -> Snapshot:
        """The VMM has written its state file: make it durable and record what it pins (every driver
        ends :meth:`snapshot` this way)."""
        size = await asyncio.to_thread(_fsync_size, state)
        digest = await asyncio.to_thread(_checksum, state)
        meta = SnapshotMeta(
            vmm=self.driver.name,
            vmm_version=await self.driver.version(),
            kind=kind,
            pinned=self.driver.pinned(self.config.machine),
            argv=tuple(self.argv),
            state_bytes=size,
            state_checksum=digest,
        )
        return Snapshot.save(dest, meta)


def log_tail(path: Path, max_bytes: int) -> str:
    """The last ``max_bytes`` of a VMM's log or console file ("" if there is none), for error messages."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _checksum(path: Path) -> str:
    """The state file's xxh3-128, hex (device state is small: a few hundred KiB with RAM left out)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_size(path: Path) -> int:
    fsync_path(path)
    return path.stat().st_size


class Driver(ABC):
    """Makes VMs. One instance per host configuration; it keeps no per-VM state. ``confines``: it runs
    VMMs under a :class:`~wrenbox.vmm.jail.Confinement` when the VM config names one."""

    name: str
    confines: bool = False

    @abstractmethod
    async def version(self) -> str:
        """The VMM's version, as snapshots record it."""

    @abstractmethod
    def pinned(self, machine: Machine) -> dict[str, Any]:
        """What a snapshot taken by this driver fixes: the machine plus the VMM's own choices."""

    @abstractmethod
    async def boot(self, config: VmConfig) -> Vm:
        """Cold-boot ``config.kernel``; returns once the VMM runs the guest (not when the guest is ready)."""

    @abstractmethod
    async def restore(self, config: VmConfig, snapshot: Snapshot) -> Vm:
        """Start a VM from ``snapshot`` with guest RAM from ``config.memory``; returns it running."""

    @abstractmethod
    def adopt(self, config: VmConfig, process: ProcessRef) -> Vm:
        """A handle on a VM started earlier (by a previous wrenbox process) that is still alive."""
