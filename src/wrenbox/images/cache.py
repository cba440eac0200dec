"""Content-addressed cache of build layers (kernel tree, debootstrap base, initramfs).

A layer lives in ``<root>/<kind>/<key>/`` and is complete once it exists there: it is built in a temp
dir beside it and renamed into place, so a crash mid-build leaves only a ``.tmp-*`` dir, which the next
build (holding the lock) removes. Mounts a build left behind (debootstrap mounts /proc in its chroot) are
unmounted before anything is deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from wrenbox.command import run
from wrenbox.fileio import publish

__all__ = ["LayerCache", "exclusive_lock", "remove_tree", "unmount_under"]

_TMP_PREFIX = ".tmp-"


class LayerCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, kind: str, key: str) -> Path | None:
        path = self.root / kind / key
        return path if path.is_dir() else None

    @contextlib.contextmanager
    def building(self, kind: str, key: str) -> Iterator[Path]:
        """A fresh temp dir to build layer ``kind/key`` in; published atomically when the block succeeds."""
        parent = self.root / kind
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f"{_TMP_PREFIX}{key[:16]}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            yield tmp
            unmount_under(tmp)
            publish(tmp, parent / key, durable=False)  # a cache: lost layers are rebuilt
        finally:
            if tmp.exists():
                remove_tree(tmp)

    def remove_stale(self) -> list[Path]:
        """Delete half-built layers. Only call while holding the cache lock: then nobody is building."""
        stale = sorted(self.root.glob(f"*/{_TMP_PREFIX}*"))
        for path in stale:
            remove_tree(path)
        return stale


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an flock on ``path`` (created if needed); other builders wait. Released if we die."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def unmount_under(path: Path) -> None:
    """Unmount everything mounted at or below ``path``, deepest first."""
    prefix = str(path.resolve())
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        run(["umount", "--lazy", point], timeout=30)


def remove_tree(path: Path) -> None:
    unmount_under(path)
    shutil.rmtree(path, ignore_errors=False)
