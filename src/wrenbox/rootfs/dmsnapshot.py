"""dm-snapshot disks (the seed's scheme), for Firecracker hosts whose kernel has device-mapper.

Per disk, a stack of block devices::

    base image ──losetup --read-only──▶ /dev/loopA   (shared by all disks on the image, see loops.py)
               [ /dev/mapper/<prefix><id>@origin : loopA + zeros up to the disk size ]  (only if larger)
    <id>.cow   ──losetup──────────────▶ /dev/loopB
    /dev/mapper/<prefix><id> = snapshot <origin> <loopB> P 8

``P`` is a persistent exception store, so the CoW file alone carries the disk across pause/resume and
restarts; chunks are 8 sectors (4 KiB). The CoW file is sparse and sized for a full rewrite of the disk
plus the store's metadata, which the seed's origin-sized store could not hold.

Names: ``<prefix><id>`` is the disk, ``@origin`` its grown origin, ``@flatten`` the temporary device
``flatten`` reads through. Disk ids cannot contain ``@`` (:func:`wrenbox.names.validate_name`), so every
device name maps back to exactly one disk, which is what lets ``reclaim`` find a crash's leftovers.

The host must not parse what the guest wrote: a disk can carry an LVM PV label, an md superblock or a
filesystem that the host's udev (blkid, LVM/md autoactivation, btrfs device scan, udisks) would act on.
Devices are created and removed with ``dmsetup --noudevrules --noudevsync``: libdevmapper makes and
removes the ``/dev/mapper`` node itself, and the uevent says "no dm and no subsystem rules" (no udev
link, LVM's own rules skip it), with nothing waiting for udev. That does not stop blkid and what
follows from it (LVM/md autoactivation): dmsetup has no switch for ``DM_UDEV_DISABLE_DISK_RULES_FLAG``
or ``DM_UDEV_DISABLE_OTHER_RULES_FLAG``. So the host also needs ``deploy/udev/12-wrenbox.rules``, which
sets those flags by device name (and skips the loop devices over wrenbox's files), and LVM commands
run by hand must skip the devices, in ``/etc/lvm/lvm.conf`` (``deploy/lvm/wrenbox-filter.conf``)::

    devices {
        global_filter = [ "r|^/dev/mapper/wrenbox-|", "r|^/dev/disk/by-id/dm-name-wrenbox-|" ]
    }

Both name the default ``RootfsConfig.dm_prefix``; adjust them if it is changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import anyio

from wrenbox.errors import (
    AlreadyExists,
    CommandFailed,
    Conflict,
    CorruptData,
    InUse,
    InvalidArgument,
    NotFound,
    WrenboxError,
)
from wrenbox.fileio import fsync_path
from wrenbox.rollback import Rollback
from wrenbox.rootfs.base import (
    SECTOR,
    BaseImage,
    Disk,
    DiskFormat,
    RootfsBackend,
    atomic_output,
    check_size,
)
from wrenbox.rootfs.loops import LoopDevice, LoopRegistry, Losetup
from wrenbox.rootfs.sparse import sparse_copy

__all__ = ["DmSnapshotBackend", "cow_size", "device_mapper_available", "parse_dmsetup_ls"]

log = logging.getLogger(__name__)

CHUNK_SECTORS = 8
_CHUNK = CHUNK_SECTORS * SECTOR
_BUSY = "Device or resource busy"
_LS_LINE = re.compile(r"^(\S+)\s+\(\d+(?::|,\s*)\d+\)$")
MAPPER = Path("/dev/mapper")
_NO_UDEV = ("--noudevrules", "--noudevsync")
"""For every ``dmsetup create`` and ``remove``: libdevmapper, not udev, manages the node (see above)."""


def device_mapper_available() -> bool:
    """Whether this kernel offers device-mapper: /proc/misc lists it, or its control node opens.

    The node alone proves nothing (a container's /dev can have it with no driver behind it); opening it
    loads the module where it is not loaded yet.
    """
    try:
        with open("/proc/misc") as misc:
            if any(line.split()[-1:] == ["device-mapper"] for line in misc):
                return True
    except OSError:
        pass
    try:
        os.close(os.open(MAPPER / "control", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def cow_size(disk_size: int) -> int:
    """Bytes of CoW store that hold a full rewrite of a ``disk_size`` disk, rounded up to 1 MiB.

    The persistent store keeps one 16-byte exception per chunk in metadata chunks of 256 entries, plus
    a header chunk; one spare metadata chunk covers the partially filled last one.
    """
    chunks = -(-disk_size // _CHUNK)
    metadata = (-(-chunks // (_CHUNK // 16)) + 2) * _CHUNK
    mib = 1 << 20
    return -(-(disk_size + metadata) // mib) * mib


def parse_dmsetup_ls(text: str) -> list[str]:
    """Device names from ``dmsetup ls`` ("name<TAB>(major:minor)" lines, or "No devices found")."""
    names = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line == "No devices found":
            continue
        match = _LS_LINE.match(line)
        if match is None:
            log.warning("ignoring unexpected 'dmsetup ls' line %r", line)
            continue
        names.append(match.group(1))
    return names


async def _shielded(fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Run a teardown step to completion even if the operation that pushed it is being cancelled."""
    with anyio.CancelScope(shield=True):
        await fn(*args)


class DmSnapshotBackend(RootfsBackend):
    name = "dmsnapshot"
    format = DiskFormat.RAW

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.losetup = Losetup(self._run)
        self.loops = LoopRegistry(self.losetup)

    # Names -------------------------------------------------------------------------------------

    def device_name(self, disk_id: str, role: str = "") -> str:
        name = self.config.dm_prefix + self._check_id(disk_id)
        return f"{name}@{role}" if role else name

    def _parse_name(self, name: str) -> tuple[str, tuple[str, ...]] | None:
        """(disk id, roles) of one of our device names, None for anyone else's."""
        if not name.startswith(self.config.dm_prefix):
            return None
        disk_id, *roles = name.removeprefix(self.config.dm_prefix).split("@")
        return disk_id, tuple(roles)

    def cow_path(self, disk_id: str) -> Path:
        return self.config.disks_dir / f"{self._check_id(disk_id)}.cow"

    # Operations --------------------------------------------------------------------------------

    async def create(self, base: Path | BaseImage, disk_id: str, size: int | None = None) -> Disk:
        name = self.device_name(disk_id)
        cow = self.cow_path(disk_id)
        image = await self._base(base)
        size = check_size(size, image)
        if cow.exists() or await self._exists(name):
            raise AlreadyExists(f"disk {disk_id} already exists")
        cow.parent.mkdir(parents=True, exist_ok=True)
        disk = Disk(
            backend=self.name,
            id=disk_id,
            path=MAPPER / name,
            format=self.format,
            store=cow,
            size=size,
            base=image,
        )
        async with Rollback(f"create disk {disk_id}") as rb:
            _create_sparse(cow, cow_size(size))
            rb.push(f"CoW store {cow}", cow.unlink, True)
            await self._activate(disk, "", rb)
            rb.commit()
        return disk

    # No checkpoints: the CoW store is held open by its loop device while the dm device exists, so it
    # cannot be swapped back in place. A resume that fails after the VM ran may leave this disk ahead of
    # its memory snapshot; the file backends do not have that gap.

    async def checkpoint(self, disk: Disk) -> None:
        log.warning("dm-snapshot disk %s: no checkpoint before resume (not supported)", disk.id)

    async def revert(self, disk: Disk) -> None:
        return None

    async def drop_checkpoint(self, disk: Disk) -> None:
        return None

    async def persist(self, disk: Disk) -> Disk:
        self._check_own(disk)
        await self._deactivate(disk, ("",))
        self._require_store(disk)
        await asyncio.to_thread(fsync_path, disk.store)
        return disk

    async def restore(self, disk: Disk) -> Disk:
        self._check_own(disk)
        disk = disk.model_copy(update={"base": await self.fingerprints.verify(disk.base)})
        self._require_store(disk)
        # A device left over from before a crash would be a second writer on the same CoW store.
        await self._deactivate(disk, ("",))
        async with Rollback(f"restore disk {disk.id}") as rb:
            await self._activate(disk, "", rb)
            rb.commit()
        return disk

    async def flatten(self, disk: Disk, dest: Path) -> BaseImage:
        self._check_own(disk)
        await self.fingerprints.verify(disk.base)
        self._require_store(disk)
        if await self._exists(self.device_name(disk.id)):
            raise Conflict(f"disk {disk.id} is in use; persist it before flattening")
        async with atomic_output(dest) as tmp:
            await self._deactivate(disk, ("flatten",))  # a crashed flatten's leftovers
            async with Rollback(f"flatten disk {disk.id}") as rb:
                device = await self._activate(disk, "flatten", rb)
                await asyncio.to_thread(sparse_copy, device, tmp, disk.size)
                await rb.aunwind()  # the temporary device is done with, success or not
        return await self.fingerprints.of(dest)

    async def remove(self, disk: Disk) -> None:
        self._check_own(disk)
        await self._deactivate(disk, ("", "flatten"))
        disk.store.unlink(missing_ok=True)

    async def reclaim(self, in_use: Iterable[Disk]) -> list[str]:
        keep = {d.id: d for d in in_use if d.backend == self.name}
        reclaimed: list[str] = []
        ours = {
            name: parsed
            for name in parse_dmsetup_ls((await self._run(["dmsetup", "ls"])).text)
            if (parsed := self._parse_name(name)) is not None
        }
        live = {disk_id for disk_id, roles in ours.values() if disk_id in keep and not roles}
        stale = [n for n, (disk_id, roles) in ours.items() if disk_id not in live or "flatten" in roles]
        # Snapshots before the origins under them.
        for name in sorted(stale, key=lambda n: n.endswith("@origin")):
            try:
                await self._remove_device(name)
                reclaimed.append(f"dm device {name}")
            except WrenboxError as exc:
                log.warning("reclaim: could not remove dm device %s: %s", name, exc)
        for disk_id in sorted(live):  # rebuild the loop registry's holders from what the kernel runs
            await self.loops.acquire(keep[disk_id].base.path, disk_id)
        reclaimed += await self._reclaim_loops(keep, live)
        reclaimed += self._reclaim_files(keep)
        return reclaimed

    # Device stacks -----------------------------------------------------------------------------

    async def _activate(self, disk: Disk, role: str, rb: Rollback) -> Path:
        """Build the device stack of ``disk`` as ``role``, pushing each undo; returns the device path."""
        name = self.device_name(disk.id, role)
        holder = name.removeprefix(self.config.dm_prefix)
        base = disk.base.path
        origin = await self.loops.acquire(base, holder)
        rb.push(f"loop device of {base}", _shielded, self.loops.release, base, holder)
        origin_size = await self._size_of(origin)
        if origin_size != disk.base.size:
            raise CorruptData(
                f"loop device {origin} of {base} is {origin_size} bytes; the base image is {disk.base.size}"
            )
        if disk.size > origin_size:
            grown = f"{name}@origin"
            table = _grown_table(origin, origin_size, disk.size)
            await self._run(["dmsetup", *_NO_UDEV, "create", grown, "--readonly"], input=table)
            rb.push(f"dm device {grown}", _shielded, self._remove_device, grown)
            origin = str(MAPPER / grown)
        cow_loop = await self.losetup.attach(disk.store, read_only=False)
        rb.push(f"loop device {cow_loop} of {disk.store}", _shielded, self.losetup.detach, cow_loop)
        table = f"0 {disk.size // SECTOR} snapshot {origin} {cow_loop} P {CHUNK_SECTORS}"
        await self._run(["dmsetup", *_NO_UDEV, "create", name, "--table", table])
        rb.push(f"dm device {name}", _shielded, self._remove_device, name)
        return MAPPER / name

    async def _deactivate(self, disk: Disk, roles: Iterable[str]) -> None:
        """Tear down the device stacks of ``disk`` for ``roles``, whatever of them exists."""
        names = [self.device_name(disk.id, role) for role in roles]
        for name in [*names, *(f"{n}@origin" for n in names)]:
            await self._remove_device(name)
        for loop in await self.losetup.associated(disk.store):
            await self.losetup.detach(loop.device)
        for name in names:
            await self.loops.release(disk.base.path, name.removeprefix(self.config.dm_prefix))

    async def _size_of(self, device: str) -> int:
        argv = ["blockdev", "--getsize64", device]
        output = (await self._run(argv)).text.strip()
        if not output.isdigit():
            raise CommandFailed(argv, 0, f"unexpected output {output[:100]!r}")
        return int(output)

    async def _exists(self, name: str) -> bool:
        return (await self._try(["dmsetup", "info", name])).returncode == 0

    async def _remove_device(self, name: str) -> None:
        """``dmsetup remove`` with the seed's patience: the VMM may not have let go of the device yet."""
        if not await self._exists(name):
            return
        argv = ["dmsetup", *_NO_UDEV, "remove", name]
        for attempt in range(1, self.config.remove_attempts + 1):
            done = await self._try(argv)
            if done.returncode == 0:
                return
            output = (done.stderr + done.stdout).decode(errors="replace")
            if _BUSY not in output:
                raise CommandFailed(argv, done.returncode, output)
            if attempt == self.config.remove_attempts:
                raise InUse(f"dm device {name} is still busy after {attempt} attempts: {output.strip()}")
            await asyncio.sleep(self.config.remove_retry_delay)

    # Reclaim helpers ---------------------------------------------------------------------------

    async def _reclaim_loops(self, keep: dict[str, Disk], live: set[str]) -> list[str]:
        reclaimed = []
        for loop in self._stale_loops(await self.losetup.list_all(), keep, live):
            try:
                await self.losetup.detach(loop.device)
                reclaimed.append(f"loop device {loop.device} ({loop.backing_file})")
            except WrenboxError as exc:
                log.warning("reclaim: could not detach %s: %s", loop.device, exc)
        return reclaimed

    def _stale_loops(
        self, loops: list[LoopDevice], keep: dict[str, Disk], live: set[str]
    ) -> list[LoopDevice]:
        """Our loop devices that no live disk needs: CoW stores in disks_dir and base images."""
        disks_dir = Path(os.path.realpath(self.config.disks_dir))
        roots = [Path(os.path.realpath(r)) for r in self.config.image_roots]
        bases = {Path(os.path.realpath(d.base.path)) for d in keep.values()}
        stale = []
        for loop in loops:
            backing = Path(loop.backing_file)
            if backing.parent == disks_dir and backing.suffix == ".cow":
                needed = backing.stem in live
            elif loop.read_only and (backing in bases or any(backing.is_relative_to(r) for r in roots)):
                needed = self.loops.device_of(backing) == loop.device
            else:
                continue  # not ours
            if not needed:
                stale.append(loop)
        return stale

    def _reclaim_files(self, keep: dict[str, Disk]) -> list[str]:
        if not self.config.disks_dir.is_dir():
            return []
        reclaimed = []
        for cow in sorted(self.config.disks_dir.glob("*.cow")):
            if cow.stem not in keep:
                cow.unlink(missing_ok=True)
                reclaimed.append(f"CoW store {cow}")
        return reclaimed

    def _check_own(self, disk: Disk) -> None:
        super()._check_own(disk)
        if disk.store != self.cow_path(disk.id) or disk.path != MAPPER / self.device_name(disk.id):
            raise InvalidArgument(f"disk record {disk.id} names devices or files that are not its own")

    def _require_store(self, disk: Disk) -> None:
        if not disk.store.is_file():
            raise NotFound(f"disk {disk.id} has no CoW store ({disk.store} is missing)")


def _grown_table(origin: str, origin_size: int, size: int) -> bytes:
    """A read-only device showing ``origin`` followed by zeros up to ``size`` bytes."""
    base, total = origin_size // SECTOR, size // SECTOR
    return f"0 {base} linear {origin} 0\n{base} {total - base} zero\n".encode()


def _create_sparse(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
