"""qcow2 overlays: each disk is a qcow2 file whose backing file is the raw base image (QEMU only).

Creating one takes milliseconds and a few hundred KiB; QEMU opens the backing file read-only, so the base
is never written. The overlay names its backing file by absolute path, which ``restore`` checks against
the record together with the size, so a moved, swapped or rewritten overlay is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wrenbox.errors import CorruptData
from wrenbox.rootfs.base import Disk, DiskFormat
from wrenbox.rootfs.filedisk import FileDiskBackend

__all__ = ["Qcow2Backend"]

CHECKPOINT_NAME = "wrenbox-checkpoint"


class Qcow2Backend(FileDiskBackend):
    name = "qcow2"
    suffix = ".qcow2"
    format = DiskFormat.QCOW2

    async def _make(self, disk: Disk) -> None:
        await self._run(
            [
                "qemu-img", "create", "-q", "-f", "qcow2",
                "-b", str(disk.base.path), "-F", "raw",
                str(disk.store), str(disk.size),
            ]
        )  # fmt: skip

    # Checkpoints are qcow2 internal snapshots: taking one copies no data (later writes allocate new
    # clusters), where a copy of the overlay would cost as much as the sandbox has written.

    async def checkpoint(self, disk: Disk) -> None:
        self._check_own(disk)
        await self.drop_checkpoint(disk)
        await self._run(["qemu-img", "snapshot", "-c", CHECKPOINT_NAME, str(disk.store)])

    async def revert(self, disk: Disk) -> None:
        self._check_own(disk)
        if CHECKPOINT_NAME in await self._snapshots(disk):
            await self._run(["qemu-img", "snapshot", "-a", CHECKPOINT_NAME, str(disk.store)])
            await self._run(["qemu-img", "snapshot", "-d", CHECKPOINT_NAME, str(disk.store)])

    async def drop_checkpoint(self, disk: Disk) -> None:
        self._check_own(disk)
        if CHECKPOINT_NAME in await self._snapshots(disk):
            await self._run(["qemu-img", "snapshot", "-d", CHECKPOINT_NAME, str(disk.store)])

    async def _snapshots(self, disk: Disk) -> set[str]:
        return {s.get("name") for s in (await self._info(disk)).get("snapshots", [])}

    async def _info(self, disk: Disk) -> dict[str, Any]:
        done = await self._run(["qemu-img", "info", "-U", "--output=json", str(disk.store)])
        try:
            return json.loads(done.text)
        except ValueError as exc:
            raise CorruptData(f"disk {disk.id}: unreadable 'qemu-img info' output: {exc}") from exc

    async def _check_store(self, disk: Disk) -> None:
        info = await self._info(disk)
        corrupt = info.get("format-specific", {}).get("data", {}).get("corrupt", False)
        found = (
            info.get("format"),
            info.get("virtual-size"),
            info.get("full-backing-filename", info.get("backing-filename")),
            info.get("backing-filename-format"),
        )
        expected = ("qcow2", disk.size, str(disk.base.path), "raw")
        if found != expected or corrupt:
            raise CorruptData(
                f"disk {disk.id}: {disk.store} is not the overlay the record describes "
                f"(format, size, backing file, backing format: found {found}, expected {expected}"
                f"{', marked corrupt' if corrupt else ''})"
            )

    async def _flatten_into(self, disk: Disk, out: Path) -> None:
        # The merged view reads through to the base, so the base must still be the recorded one.
        await self.fingerprints.verify(disk.base)
        await self._check_store(disk)
        # qemu-img convert writes zero runs as holes: the result is as sparse as its content. -U: a
        # stopped VM (a fork snapshots a running sandbox in place) still holds the overlay's write lock;
        # its vCPUs are stopped and its writes flushed, so reading alongside it is safe.
        await self._run(
            ["qemu-img", "convert", "-q", "-U", "-f", "qcow2", "-O", "raw", str(disk.store), str(out)],
            timeout=self.config.flatten_timeout,
        )
