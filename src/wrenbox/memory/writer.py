"""Atomic snapshot directories: build in a temporary directory, fsync, then rename into place.

::

    with Chain.open(snapshot_dir) as parent, SnapshotWriter(snapshot_dir, replace=True) as writer:
        vm.save_state(writer.path / "snapfile")        # anything else the snapshot needs goes here too
        process_diff(ram_file, parent, writer.path)
        writer.commit()

Until ``commit()`` returns, ``dest`` is exactly what it was; afterwards it is the complete new snapshot.
If the block raises before ``commit()``, the temporary directory is removed. A crash leaves at most a
temporary directory ``.<name>.tmp-<hex>`` next to ``dest``, which :func:`reclaim` removes on restart.

``commit()`` is :func:`wrenbox.fileio.publish`: fsync every file and directory in the temporary tree, put
it at ``dest`` in one rename (``replace=True`` swaps old and new in one step), fsync the parent directory,
and delete the old snapshot. There is no
moment at which ``dest`` is missing or partial, and a reader that opened the old snapshot keeps its open
files (the page server of a running VM does).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import TracebackType

from wrenbox.errors import AlreadyExists, Conflict, NotFound
from wrenbox.fileio import publish, temp_prefix, temp_sibling

__all__ = ["SnapshotWriter", "reclaim"]

log = logging.getLogger(__name__)


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
        publish(self.path, self.dest, replace=self.replace)
        self._committed = True
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
