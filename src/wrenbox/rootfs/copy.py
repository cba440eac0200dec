"""The fallback backend: every disk is a full sparse copy of its base image. Works on any filesystem."""

from __future__ import annotations

import asyncio
from pathlib import Path

from wrenbox.rootfs.base import Disk
from wrenbox.rootfs.filedisk import FileDiskBackend
from wrenbox.rootfs.sparse import sparse_copy

__all__ = ["CopyBackend"]


class CopyBackend(FileDiskBackend):
    """Disks are independent sparse copies: slow to create, but no filesystem or VMM requirements."""

    name = "copy"
    suffix = ".copy.raw"

    async def _make(self, disk: Disk) -> None:
        await asyncio.to_thread(sparse_copy, disk.base.path, disk.store, disk.size)

    async def _flatten_into(self, disk: Disk, out: Path) -> None:
        await asyncio.to_thread(sparse_copy, disk.store, out, disk.size)
