"""Room kept for the store on the data filesystem, so that a full disk never strands a sandbox.

When the data filesystem fills up (a pause writing its memory, a guest growing its disk), the store's
next writes fail with SQLITE_FULL. The writes that *settle* a sandbox must land anyway: the move back to
``running`` after a failed pause, every write of a destroy (which is how a user frees space). Otherwise the
sandbox stays ``pausing`` or ``stopping`` until a restart, and the destroy that would free space fails.

Why files of our own and not SQLite settings: in WAL mode a commit appends frames to the WAL, whose file
is deleted when the last connection closes and grows again from nothing, and a checkpoint grows the
database when rows were added; no pragma guarantees a write needs no new blocks. So the store keeps a few
preallocated chunk files beside it and, when a write is refused for want of space (SQLite rolled it back),
gives one chunk back to the filesystem and tries again (:meth:`Reserve.draw`). Several chunks rather than
one file: a settling write needs some KiB, so a drawn chunk leaves most of its room to the next writes
(the destroy after a failed pause), and the rest of the reserve stays held.

Nobody else is kept out of a drawn chunk's room: a guest writing at that moment may take it. That is why
an operation that is about to spend space (create, pause, resume, snapshot) first makes the reserve whole
again (:meth:`Reserve.refill`) and is refused when it cannot: with less free room than the reserve it would
fail anyway, and starting it then could leave nothing to settle it with.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from wrenbox.fileio import temp_prefix, temp_sibling, write_at

__all__ = ["Reserve"]

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.EINVAL)


class Reserve:
    """``chunks`` files of ``chunk_bytes`` each, allocated, in ``directory`` (made if missing)."""

    def __init__(self, directory: Path, *, chunks: int = 4, chunk_bytes: int = 2 << 20) -> None:
        self.directory = directory
        self.chunk_bytes = chunk_bytes
        self._chunks = [directory / f"chunk-{i}" for i in range(chunks)]

    @classmethod
    def beside(cls, db: Path, **sizes: int) -> Reserve:
        """The reserve of the store at ``db``: a directory next to it."""
        return cls(db.with_name(f"{db.name}.reserve"), **sizes)

    @property
    def size(self) -> int:
        """Bytes the whole reserve holds."""
        return len(self._chunks) * self.chunk_bytes

    def held(self) -> int:
        """Bytes it holds now (less than :attr:`size` after draws the filesystem had no room to refill)."""
        return sum(self.chunk_bytes for path in self._chunks if path.exists())

    def refill(self) -> bool:
        """Allocate the missing chunks; False when the filesystem has no room for them (then nothing
        half-made is left: a chunk appears only whole, by rename)."""
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            self._remove_temporaries()  # of a refill a crash interrupted
            for path in self._chunks:
                if not path.exists():
                    self._allocate(path)
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            return False
        return True

    def draw(self) -> bool:
        """Give one chunk's room back to the filesystem; False when the reserve is spent."""
        for path in reversed(self._chunks):
            if path.exists():
                path.unlink()
                return True
        return False

    def _allocate(self, path: Path) -> None:
        tmp = temp_sibling(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, self.chunk_bytes)
            except OSError as exc:
                if exc.errno not in _NO_FALLOCATE:
                    raise
                write_at(fd, memoryview(bytes(self.chunk_bytes)), 0)  # no fallocate here: real blocks
            os.fsync(fd)
            tmp.rename(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def _remove_temporaries(self) -> None:
        for path in self._chunks:
            for tmp in self.directory.glob(f"{temp_prefix(path)}*"):
                tmp.unlink(missing_ok=True)
