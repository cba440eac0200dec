"""Reflink clones: each disk is a FICLONE of its base image (xfs with reflink=1, or btrfs).

A clone takes a fraction of a millisecond and no space until the guest writes; it is a plain raw file,
so Firecracker and QEMU both take it as a drive, and it is already standalone (nothing to merge).
The base image and ``disks_dir`` must be on the same reflink-capable filesystem; anywhere else creating
a disk fails with :class:`~wrenbox.errors.Unsupported` rather than quietly making a full copy.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import re
import tempfile
from pathlib import Path

from wrenbox.errors import Unsupported
from wrenbox.rootfs.base import Disk
from wrenbox.rootfs.filedisk import FileDiskBackend
from wrenbox.rootfs.sparse import sparse_copy

__all__ = ["ReflinkBackend", "clone_file", "filesystem_type", "supports_reflink"]

log = logging.getLogger(__name__)

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
_NO_REFLINK = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV)


def clone_file(src: Path, dst: Path, size: int | None = None) -> None:
    """Make the new file ``dst`` a reflink clone of ``src``, extended to ``size`` if larger.

    Raises OSError (EOPNOTSUPP, EXDEV, ...) when the filesystem cannot clone; ``dst`` may then exist
    empty and is the caller's to remove.
    """
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
            if size is not None and size > os.fstat(sfd).st_size:
                os.ftruncate(dfd, size)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on (from /proc/self/mounts), ``"unknown"`` if unsure."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 3:
                continue
            # mount points escape blanks and backslashes as octal (\040)
            mountpoint = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
            inside = target == mountpoint or target.startswith(mountpoint.rstrip("/") + "/")
            if inside and len(mountpoint) >= len(best):
                best, kind = mountpoint, fields[2]
    return kind


def supports_reflink(directory: Path) -> bool:
    """Whether files in ``directory`` can be reflink-cloned (a real FICLONE on two scratch files)."""
    with tempfile.TemporaryDirectory(dir=directory, prefix=".reflink-probe-") as scratch:
        src, dst = Path(scratch) / "src", Path(scratch) / "dst"
        src.write_bytes(b"\1" * 4096)
        try:
            clone_file(src, dst)
        except OSError as exc:
            if exc.errno in _NO_REFLINK:
                return False
            raise
        return True


class ReflinkBackend(FileDiskBackend):
    name = "reflink"
    suffix = ".reflink.raw"

    async def _make(self, disk: Disk) -> None:
        try:
            await asyncio.to_thread(clone_file, disk.base.path, disk.store, disk.size)
        except OSError as exc:
            if exc.errno not in _NO_REFLINK:
                raise
            raise Unsupported(self._why_not(disk.base.path, exc)) from exc

    def _why_not(self, base: Path, exc: OSError) -> str:
        disks = self.config.disks_dir
        if exc.errno == errno.EXDEV:
            return (
                f"reflink clones need the base image and the disks directory on one filesystem; "
                f"{base} and {disks} are on different ones (use the qcow2 or copy backend, or move them)"
            )
        return (
            f"the {filesystem_type(disks)} filesystem holding {disks} cannot make reflink clones "
            f"({os.strerror(exc.errno or 0)}); use xfs (mkfs.xfs -m reflink=1) or btrfs, "
            f"or the qcow2 or copy backend"
        )

    async def _flatten_into(self, disk: Disk, out: Path) -> None:
        # The clone is already a standalone image; cloning it again is all a template needs.
        await asyncio.to_thread(_clone_or_copy, disk.store, out, disk.size)


def _clone_or_copy(src: Path, dst: Path, size: int) -> None:
    try:
        clone_file(src, dst)
    except OSError as exc:
        if exc.errno not in _NO_REFLINK:
            raise
        # Flattening is correct either way; only creating a disk must refuse to copy silently.
        log.info("cannot reflink %s to %s (%s); writing a sparse copy", src, dst, exc)
        dst.unlink(missing_ok=True)
        sparse_copy(src, dst, size)
