"""What the file-backed backends (qcow2, reflink, copy) share: one file per disk in ``disks_dir``.

The file *is* the disk, so persisting is an fsync, restoring is a check, and reclaiming after a crash is
deleting the files no record refers to. Subclasses say how the file is made, checked and flattened.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from wrenbox.errors import AlreadyExists, CorruptData, InvalidArgument, NotFound
from wrenbox.fileio import clone_or_copy, fsync_path, publish, temp_sibling
from wrenbox.rollback import Rollback
from wrenbox.rootfs.base import (
    BaseImage,
    Disk,
    DiskFormat,
    RootfsBackend,
    atomic_output,
    check_size,
)

__all__ = ["CHECKPOINT", "FileDiskBackend"]

CHECKPOINT = ".checkpoint"  # suffix of a disk file's checkpoint copy


class FileDiskBackend(RootfsBackend):
    suffix: ClassVar[str]
    format: ClassVar[DiskFormat] = DiskFormat.RAW

    def store_path(self, disk_id: str) -> Path:
        return self.config.disks_dir / f"{self._check_id(disk_id)}{self.suffix}"

    @abc.abstractmethod
    async def _make(self, disk: Disk) -> None:
        """Create ``disk.store`` (it does not exist yet) showing the base at ``disk.size`` bytes."""

    async def _check_store(self, disk: Disk) -> None:
        """CorruptData if ``disk.store`` is not the disk the record describes (raw: its size)."""
        actual = disk.store.stat().st_size
        if actual != disk.size:
            raise CorruptData(f"disk {disk.id}: {disk.store} is {actual} bytes, the record says {disk.size}")

    @abc.abstractmethod
    async def _flatten_into(self, disk: Disk, out: Path) -> None:
        """Write the merged content of the disk to the new file ``out`` (sparse raw)."""

    async def create(self, base: Path | BaseImage, disk_id: str, size: int | None = None) -> Disk:
        store = self.store_path(disk_id)
        image = await self._base(base)
        size = check_size(size, image)
        if store.exists():
            raise AlreadyExists(f"disk {disk_id} already exists ({store})")
        store.parent.mkdir(parents=True, exist_ok=True)
        disk = Disk(
            backend=self.name,
            id=disk_id,
            path=store,
            format=self.format,
            store=store,
            size=size,
            base=image,
        )
        with Rollback(f"create disk {disk_id}") as rb:
            rb.push(f"disk file {store}", store.unlink, True)
            await self._make(disk)
            rb.commit()
        return disk

    async def persist(self, disk: Disk) -> Disk:
        self._check_own(disk)
        self._require_store(disk)
        # The VM is gone, but its writes may still be only in the page cache.
        await asyncio.to_thread(fsync_path, disk.store)
        return disk

    async def restore(self, disk: Disk) -> Disk:
        self._check_own(disk)
        base = await self.fingerprints.verify(disk.base)
        disk = disk.model_copy(update={"base": base})
        self._require_store(disk)
        await self._check_store(disk)
        return disk

    async def flatten(self, disk: Disk, dest: Path) -> BaseImage:
        self._check_own(disk)
        self._require_store(disk)
        async with atomic_output(dest) as tmp:
            await self._flatten_into(disk, tmp)
        return await self.fingerprints.of(dest)

    async def remove(self, disk: Disk) -> None:
        self._check_own(disk)
        self.checkpoint_path(disk).unlink(missing_ok=True)
        disk.store.unlink(missing_ok=True)

    # Checkpoints: a copy of the disk file beside it (a reflink on XFS/btrfs, else a sparse copy).

    def checkpoint_path(self, disk: Disk) -> Path:
        return disk.store.with_name(disk.store.name + CHECKPOINT)

    async def checkpoint(self, disk: Disk) -> None:
        self._check_own(disk)
        self._require_store(disk)
        await asyncio.to_thread(_copy_durably, disk.store, self.checkpoint_path(disk))

    async def revert(self, disk: Disk) -> None:
        self._check_own(disk)
        saved = self.checkpoint_path(disk)
        if saved.exists():
            await asyncio.to_thread(_replace_durably, saved, disk.store)

    async def drop_checkpoint(self, disk: Disk) -> None:
        self._check_own(disk)
        self.checkpoint_path(disk).unlink(missing_ok=True)

    async def reclaim(self, in_use: Iterable[Disk]) -> list[str]:
        keep = {d.store for d in in_use}
        if not self.config.disks_dir.is_dir():
            return []
        reclaimed = []
        checkpoints = self.config.disks_dir.glob(f"*{self.suffix}{CHECKPOINT}")
        for path in sorted([*self.config.disks_dir.glob(f"*{self.suffix}"), *checkpoints]):
            if path not in keep and path.with_name(path.name.removesuffix(CHECKPOINT)) not in keep:
                path.unlink(missing_ok=True)
                reclaimed.append(f"disk file {path}")
        return reclaimed

    def _check_own(self, disk: Disk) -> None:
        super()._check_own(disk)
        # A record is trusted only to name one of our own files: never delete or open anything else.
        if disk.store != self.store_path(disk.id) or disk.path != disk.store:
            raise InvalidArgument(f"disk record {disk.id} names files outside {self.config.disks_dir}")

    def _require_store(self, disk: Disk) -> None:
        if not disk.store.is_file():
            raise NotFound(f"disk {disk.id} has no data file ({disk.store} is missing)")


def _copy_durably(src: Path, dst: Path) -> None:
    """``dst`` becomes a durable copy of ``src``, replacing any older one only once complete."""
    tmp = temp_sibling(dst)
    clone_or_copy(src, tmp)
    try:
        publish(tmp, dst, replace=True)
    finally:
        tmp.unlink(missing_ok=True)


def _replace_durably(src: Path, dst: Path) -> None:
    publish(src, dst, replace=True)
