"""Turning raw guest memory into compact, chained snapshots.

Three operations, each writing ``memfile.<build>`` (when there is anything to store) and
``memfile.header`` (version 2) into an existing directory ``dest`` — normally the temporary directory
of a :class:`~wrenbox.memory.writer.SnapshotWriter`, whose ``commit()`` makes them durable and visible
at once. The input files and the parent snapshot are only read; a call that fails removes what it
created (bad input is refused before anything is created).

``process_full(raw, dest)``
    Generation 0. All-zero blocks are dropped (holes of a sparse raw file are not even read), the other
    blocks are packed in address order into one diff file.
``process_diff(raw, parent, dest, kind=...)``
    Generation ``parent + 1``: stores exactly the blocks that changed since ``parent``, laid over the
    parent's mappings; the parent's diff files still referenced are hard-linked into ``dest`` so each
    snapshot directory is self-contained. What "changed" means depends on what ``raw`` is:

    * ``RawKind.FULL`` — the complete guest memory (a QEMU RAM file, a Firecracker Full memfile): each
      block is compared with the parent's content, read through the parent's chain.
    * ``RawKind.SPARSE_DIFF`` — a Firecracker Diff memfile: the pages dirtied since the parent are
      written (allocated) and the rest are holes, so the file's data extents (SEEK_DATA/SEEK_HOLE) *are*
      the dirty set. A dirtied page that reads all-zero is a change to zero, never "unchanged".

    A changed block that is all zero is mapped to the zero build instead of being stored. When the new
    generation would reach ``MemoryConfig.max_generations``, or its diff files (the new one plus the
    parent's still referenced) would hold more than ``MemoryConfig.max_stored_ratio`` times the memory
    size, the result is collapsed instead: one new generation-0 diff holding all live data, no links
    to old diffs (the old files go away with the parent directory). The size cap matters because a
    diff file is kept whole while any block of it is live: a guest that rewrites all of its memory
    but one block per generation would otherwise make the chain hold ``max_generations`` times it.
    That is known only once the changes are stored, so then the new diff is written twice.
``collapse(chain, dest)``
    The same collapse for any open chain (e.g. to flatten a template).

How: :mod:`wrenbox.memory.scan` classifies blocks on a read-only mapping of the raw file (holes are never
read); :mod:`wrenbox.memory.pack` appends the data to the new diff as each stretch is scanned (blocks
shared with FICLONERANGE on XFS/btrfs, written otherwise) and checksums it on the way. No numpy.
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from wrenbox.errors import InvalidArgument, Unsupported
from wrenbox.fileio import copy_range, write_new
from wrenbox.memory.chain import Chain
from wrenbox.memory.format import (
    BLOCK_SIZE,
    HEADER_NAME,
    ZERO_BUILD,
    DiffFile,
    Header,
    Mapping,
    diff_name,
    new_build_id,
    normalize,
    overlay,
)
from wrenbox.memory.pack import DiffWriter, Source, pack
from wrenbox.memory.scan import DATA, RawFile, Runs, changed_runs, dirty_runs, nonzero_runs
from wrenbox.rollback import Rollback

__all__ = ["MemoryConfig", "RawKind", "collapse", "process_diff", "process_full"]

_RAW = UUID(int=1)  # stands for "the raw file" in logical mappings before they are packed


class RawKind(enum.Enum):
    """What a raw memory file handed to :func:`process_diff` contains."""

    FULL = "full"
    """The complete guest memory."""
    SPARSE_DIFF = "sparse-diff"
    """Only the pages dirtied since the parent are written; everything else is a hole."""


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    max_generations: int = 8
    """A chain holds at most this many generations; the diff that would exceed it is collapsed."""
    max_stored_ratio: float = 2.0
    """A snapshot's diff files hold at most this many times the guest memory size; a diff that would
    exceed it is collapsed. Without it a guest that keeps one block of every generation live makes a
    paused sandbox hold about ``max_generations`` times its memory. At least 1: a collapse stores at
    most the memory size."""

    def __post_init__(self) -> None:
        if self.max_generations < 1:
            raise InvalidArgument(f"max_generations must be at least 1, not {self.max_generations}")
        if not self.max_stored_ratio >= 1:  # also refuses NaN
            raise InvalidArgument(f"max_stored_ratio must be at least 1, not {self.max_stored_ratio}")


def process_full(raw: Path, dest: Path) -> Header:
    """Write generation 0 of ``raw`` (complete guest memory) into ``dest``; return its header."""
    dest, build = Path(dest), new_build_id()
    with Rollback(f"memory snapshot into {dest}") as undo:
        with RawFile(raw) as source, DiffWriter(dest, build) as writer:
            undo.push(str(writer.path), _remove, writer.path)
            data = _store(nonzero_runs(source), source, writer)
            info = writer.finish()
            size = source.size
        header = _write_header(dest, size, 0, build, build, _fill_gaps(data, size), [info] if info else [])
        undo.commit()
    return header


def process_diff(
    raw: Path,
    parent: Chain,
    dest: Path,
    *,
    kind: RawKind = RawKind.FULL,
    config: MemoryConfig = MemoryConfig(),
) -> Header:
    """Write the next generation after ``parent`` into ``dest`` (collapsed at the caps); return its header."""
    dest = Path(dest)
    if dest.resolve() == parent.directory.resolve():
        raise InvalidArgument("a new generation must be written next to its parent, not into its directory")
    if parent.block_size != BLOCK_SIZE:
        raise Unsupported(
            f"parent snapshot has block size {parent.block_size}; only {BLOCK_SIZE} is supported"
        )
    with Rollback(f"memory snapshot into {dest}") as undo, RawFile(raw) as source:
        changes = _changes(source, parent, kind)
        sources = {_RAW: (source.fd, source.view), **_sources(parent)}
        if parent.generation + 1 >= config.max_generations:  # one new generation 0, in address order
            top = [_as_mapping(run, _RAW, run[0]) for runs in changes for run in runs]
            header = _write_collapsed(dest, parent.size, overlay(parent.header.mappings, top), sources, undo)
        else:
            build, mappings, files = _store_diff(dest, parent, changes, source, undo)
            if sum(f.length for f in files) <= config.max_stored_ratio * parent.size:
                header = _write_generation(dest, parent, build, mappings, files, undo)
            else:
                # Known only once the changes are stored: collapse instead, the new blocks read from
                # the raw file (each at its own address there), the rest through the parent.
                _remove(dest / diff_name(build))
                logical = [_from_raw(m) if m.build_id == build else m for m in mappings]
                header = _write_collapsed(dest, parent.size, logical, sources, undo)
        undo.commit()
    return header


def collapse(chain: Chain, dest: Path) -> Header:
    """Write ``chain``'s memory as one generation-0 diff into ``dest``; return its header."""
    dest = Path(dest)
    with Rollback(f"collapsed memory snapshot into {dest}") as undo:
        header = _write_collapsed(dest, chain.size, chain.header.mappings, _sources(chain), undo)
        undo.commit()
    return header


def _store_diff(
    dest: Path, parent: Chain, changes: Iterable[Runs], source: RawFile, undo: Rollback
) -> tuple[UUID, list[Mapping], list[DiffFile]]:
    """The changed blocks in a new diff: its build, the mappings over the parent's, every file they use."""
    with DiffWriter(dest, new_build_id()) as writer:
        undo.push(str(writer.path), _remove, writer.path)
        mappings = normalize(overlay(parent.header.mappings, _store(changes, source, writer)))
        info = writer.finish()
    kept = dict.fromkeys(m.build_id for m in mappings if not m.is_zero and m.build_id != writer.build)
    files = [info] if info else []
    return writer.build, mappings, files + [parent.file_info(b) for b in kept]


def _write_generation(
    dest: Path, parent: Chain, build: UUID, mappings: list[Mapping], files: list[DiffFile], undo: Rollback
) -> Header:
    """Generation ``parent + 1``: the parent's diffs still used linked next to the new one, the header."""
    for f in files:
        if f.build_id != build:
            _link_or_copy(parent.path(f.build_id), dest / diff_name(f.build_id))
            undo.push(diff_name(f.build_id), _remove, dest / diff_name(f.build_id))
    base = parent.header.base_build_id
    return _write_header(dest, parent.size, parent.generation + 1, build, base, mappings, files)


def _write_collapsed(
    dest: Path, size: int, logical: Iterable[Mapping], sources: dict[UUID, Source], undo: Rollback
) -> Header:
    """Generation 0: all of ``logical``'s data in one new diff, in address order, then the header."""
    with DiffWriter(dest, new_build_id()) as writer:
        undo.push(str(writer.path), _remove, writer.path)
        mappings = pack(logical, sources, writer)
        info = writer.finish()
    return _write_header(dest, size, 0, writer.build, writer.build, mappings, [info] if info else [])


def _from_raw(m: Mapping) -> Mapping:
    """A mapping of the raw file: its bytes sit at their own address there."""
    return Mapping(m.offset, m.length, _RAW, m.offset)


def _changes(source: RawFile, parent: Chain, kind: RawKind) -> Iterator[Runs]:
    if source.size != parent.size:
        raise InvalidArgument(f"{source.path} holds {source.size} bytes, the parent snapshot {parent.size}")
    if kind is RawKind.SPARSE_DIFF:
        source.require_block_granular_holes()
        return dirty_runs(source)
    return changed_runs(source, parent)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _store(batches: Iterable[Runs], source: RawFile, writer: DiffWriter) -> list[Mapping]:
    """Runs of ``source`` as mappings: data appended to ``writer`` as each batch arrives, zero runs kept."""
    out: list[Mapping] = []
    for runs in batches:
        for run in runs:
            start, end, kind = run
            at = writer.append((source.fd, source.view), start, end - start) if kind == DATA else 0
            out.append(_as_mapping(run, writer.build, at))
    return normalize(out)


def _as_mapping(run: list[int], build: UUID, storage_offset: int) -> Mapping:
    start, end, kind = run
    if kind == DATA:
        return Mapping(start, end - start, build, storage_offset)
    return Mapping(start, end - start, ZERO_BUILD, 0)


def _sources(chain: Chain) -> dict[UUID, Source]:
    return {b: (chain.fileno(b), chain.view(b)) for b in chain.header.builds}


def _fill_gaps(data: list[Mapping], size: int) -> list[Mapping]:
    out, position = [], 0
    for m in data:
        if m.offset > position:
            out.append(Mapping(position, m.offset - position, ZERO_BUILD, 0))
        out.append(m)
        position = m.end
    if position < size:
        out.append(Mapping(position, size - position, ZERO_BUILD, 0))
    return normalize(out)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Diff files never change once written, so a hard link is as good as a copy."""
    try:
        os.link(src, dst)
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
    fd_in = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            copy_range(fd_in, fd_out, 0, 0, os.fstat(fd_in).st_size)
        except BaseException:
            dst.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def _write_header(
    dest: Path,
    size: int,
    generation: int,
    build: UUID,
    base: UUID,
    mappings: list[Mapping],
    files: list[DiffFile],
) -> Header:
    header = Header(size, generation, build, base, tuple(mappings), tuple(files))
    write_new(Path(dest) / HEADER_NAME, header.encode())
    return header
