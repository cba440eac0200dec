"""Atomic snapshot directories: build in a temporary directory, fsync, then rename into place.

::

    with Chain.open(snapshot_dir) as parent, SnapshotWriter(snapshot_dir, replace=True) as writer:
        vm.save_state(writer.path / "snapfile")        # anything else the snapshot needs goes here too
        process_diff(ram_file, parent, writer.path)
        writer.commit()

Until ``commit()`` returns, ``dest`` is exactly what it was; afterwards it is the complete new snapshot.
If the block raises before ``commit()``, the temporary directory is removed. A crash leaves at most a
temporary directory ``.<name>.tmp-<hex>`` next to ``dest``, which :func:`reclaim` removes on restart.

``commit()``: fsync every file and directory in the temporary tree, then ``renameat2`` it onto ``dest``
(``RENAME_NOREPLACE``, or ``RENAME_EXCHANGE`` with ``replace=True``, which swaps old and new in one step),
fsync the parent directory, and delete the old snapshot now sitting at the temporary name. There is no
moment at which ``dest`` is missing or partial, and a reader that opened the old snapshot keeps its open
files (the page server of a running VM does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
from pathlib import Path
from types import TracebackType

from wrenbox.errors import AlreadyExists, Conflict, NotFound, Unsupported
from wrenbox.fileio import fsync_path, fsync_tree, temp_prefix, temp_sibling

__all__ = ["SnapshotWriter", "reclaim"]

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src), None, str(dst))


class SnapshotWriter:
    """Builds ``dest`` in a temporary sibling directory (:attr:`path`) and publishes it atomically."""

    def __init__(self, dest: Path, *, replace: bool = False) -> None:
        self.dest = Path(dest)
        self.replace = replace
        self.path = temp_sibling(self.dest)
        self._committed = False

    def __enter__(self) -> SnapshotWriter:
        if not self.dest.parent.is_dir():
            raise NotFound(f"{self.dest.parent} does not exist")
        if not self.replace and self.dest.exists():
            raise AlreadyExists(f"{self.dest} already exists")
        self.path.mkdir(mode=0o700)
        return self

    def commit(self) -> Path:
        """Make the temporary directory durable and put it at ``dest``; return ``dest``."""
        if self._committed:
            raise Conflict(f"{self.dest} was already committed")
        fsync_tree(self.path)
        exchanged = self.replace and self.dest.exists()
        try:
            _renameat2(self.path, self.dest, _RENAME_EXCHANGE if exchanged else _RENAME_NOREPLACE)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise AlreadyExists(f"{self.dest} already exists") from None
            if exc.errno == errno.EINVAL:
                raise Unsupported(f"the filesystem of {self.dest.parent} cannot rename atomically") from exc
            raise
        self._committed = True
        fsync_path(self.dest.parent)
        if exchanged:  # the old snapshot now sits at self.path
            try:
                shutil.rmtree(self.path)
            except OSError as exc:
                log.warning("could not remove the replaced snapshot %s (reclaim will): %s", self.path, exc)
        return self.dest

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Not committed: the half-built snapshot. Committed: nothing, or the replaced snapshot if removing
        # it failed above. Either way it is garbage.
        shutil.rmtree(self.path, ignore_errors=True)


def reclaim(dest: Path) -> list[Path]:
    """Remove the temporaries a crash left next to ``dest``; return what was removed.

    That covers a :class:`SnapshotWriter`'s directory for ``dest`` and a half-built RAM file of
    :meth:`~wrenbox.memory.chain.Chain.materialize` to ``dest``. Only call it when nothing is building
    ``dest`` (at startup, or under the owner's lock).
    """
    dest = Path(dest)
    prefix = temp_prefix(dest)
    removed = []
    if dest.parent.is_dir():
        for entry in dest.parent.iterdir():
            if entry.name.startswith(prefix):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed
