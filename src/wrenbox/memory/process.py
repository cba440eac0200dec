"""Turning raw guest memory into compact, chained snapshots.

Three operations, each writing ``memfile.<build>`` (when there is anything to store) and
``memfile.header`` (version 2) into an existing directory ``dest`` — normally the temporary directory
of a :class:`~wrenbox.memory.writer.SnapshotWriter`, whose ``commit()`` makes them durable and visible
at once. The input files and the parent snapshot are only read.

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
    generation would reach ``MemoryConfig.max_generations`` the result is collapsed instead: one new
    generation-0 diff holding all live data, no links to old diffs (the old files go away with the
    parent directory).
``collapse(chain, dest)``
    The same collapse for any open chain (e.g. to flatten a template).

The scans work on read-only mmaps with ``mmap.find`` used as a zero-copy block comparison (a block
equals a needle iff the needle is found at its first byte within its bounds); data is moved with
``copy_file_range``, which reflinks on XFS/btrfs. No numpy.
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import xxhash

from wrenbox.errors import InvalidArgument, NotFound, Unsupported
from wrenbox.memory.chain import Chain
from wrenbox.memory.fileio import copy_range, data_extents, write_new
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

__all__ = ["MemoryConfig", "RawKind", "collapse", "process_diff", "process_full"]

_CHUNK = 64 * 1024  # compare this much at once first; most chunks are all-zero or all-unchanged
_ZERO, _DATA = 0, 1  # kinds of changed runs
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

    def __post_init__(self) -> None:
        if self.max_generations < 1:
            raise InvalidArgument(f"max_generations must be at least 1, not {self.max_generations}")


def process_full(raw: Path, dest: Path) -> Header:
    """Write generation 0 of ``raw`` (complete guest memory) into ``dest``; return its header."""
    with _RawFile(raw) as source:
        runs: list[list[int]] = []
        for start, end in source.extents:
            _scan_zero(source.map, start, end, runs, record_zero=False)
        build = new_build_id()
        logical = _fill_gaps([Mapping(s, e - s, _RAW, s) for s, e, _ in runs], source.size)
        mappings, info = _pack(dest, build, logical, {_RAW: source.source})
    return _write_header(dest, source.size, 0, build, build, mappings, [info] if info else [])


def process_diff(
    raw: Path,
    parent: Chain,
    dest: Path,
    *,
    kind: RawKind = RawKind.FULL,
    config: MemoryConfig = MemoryConfig(),
) -> Header:
    """Write the next generation after ``parent`` into ``dest`` (collapsed at the cap); return its header."""
    dest = Path(dest)
    if dest.resolve() == parent.directory.resolve():
        raise InvalidArgument("a new generation must be written next to its parent, not into its directory")
    if parent.block_size != BLOCK_SIZE:
        raise Unsupported(
            f"parent snapshot has block size {parent.block_size}; only {BLOCK_SIZE} is supported"
        )
    with _RawFile(raw) as source:
        if source.size != parent.size:
            raise InvalidArgument(f"{raw} holds {source.size} bytes, the parent snapshot {parent.size}")
        if kind is RawKind.SPARSE_DIFF:
            _require_block_granular_holes(source.fd, raw)
            changes = _dirty_changes(source)
        else:
            changes = _compared_changes(source, parent)
        top = [
            Mapping(s, e - s, _RAW if k == _DATA else ZERO_BUILD, s if k == _DATA else 0)
            for s, e, k in changes
        ]
        build = new_build_id()
        sources = {_RAW: source.source, **_sources(parent)}
        generation = parent.generation + 1
        if generation >= config.max_generations:
            mappings, info = _pack(dest, build, normalize(overlay(parent.header.mappings, top)), sources)
            return _write_header(dest, source.size, 0, build, build, mappings, [info] if info else [])
        new_top, info = _pack(dest, build, top, sources)
    mappings = normalize(overlay(parent.header.mappings, new_top))
    files = []
    for b in dict.fromkeys(m.build_id for m in mappings if not m.is_zero):
        if b == build:
            files.append(info)
        else:
            _link_or_copy(parent.path(b), dest / diff_name(b))
            files.append(parent.file_info(b))
    return _write_header(dest, source.size, generation, build, parent.header.base_build_id, mappings, files)


def collapse(chain: Chain, dest: Path) -> Header:
    """Write ``chain``'s memory as one generation-0 diff into ``dest``; return its header."""
    build = new_build_id()
    mappings, info = _pack(Path(dest), build, chain.header.mappings, _sources(chain))
    return _write_header(Path(dest), chain.size, 0, build, build, mappings, [info] if info else [])


def _sources(chain: Chain) -> dict[UUID, tuple[int, memoryview]]:
    return {b: (chain.fileno(b), chain.view(b)) for b in chain.header.builds}


# -- the raw input ---------------------------------------------------------------------------------------


class _RawFile:
    """A raw memory file opened read-only and mapped, with its data extents (block-aligned)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"raw memory file {self.path} does not exist") from None

    def __enter__(self) -> _RawFile:
        try:
            self.size = os.fstat(self.fd).st_size
            if self.size <= 0 or self.size % BLOCK_SIZE:
                raise InvalidArgument(
                    f"{self.path}: {self.size} bytes is not a whole number of {BLOCK_SIZE} B blocks"
                )
            self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
            self.source = (self.fd, memoryview(self.map))
            self.extents = [
                (s // BLOCK_SIZE * BLOCK_SIZE, -(-e // BLOCK_SIZE) * BLOCK_SIZE)
                for s, e in data_extents(self.fd, self.size)
            ]
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.source[1].release()
        self.map.close()
        os.close(self.fd)


def _require_block_granular_holes(fd: int, path: Path) -> None:
    # A larger allocation unit would make clean neighbours of a dirty page look like "changed to zero".
    unit = os.fstatvfs(fd).f_frsize
    if unit > BLOCK_SIZE:
        raise Unsupported(
            f"{path}: filesystem allocates in {unit} B units; sparse diffs need <= {BLOCK_SIZE} B"
        )


# -- scans: each appends [start, end, kind] runs in address order -------------------------------------
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_ZERO_CHUNK = bytes(_CHUNK)


def _add(runs: list[list[int]], start: int, end: int, kind: int) -> None:
    if runs and runs[-1][1] == start and runs[-1][2] == kind:
        runs[-1][1] = end
    else:
        runs.append([start, end, kind])


def _scan_zero(mem: mmap.mmap, start: int, end: int, runs: list[list[int]], *, record_zero: bool) -> None:
    """Classify the blocks of ``[start, end)`` as zero or data."""
    find, position = mem.find, start
    while position < end:
        n = min(_CHUNK, end - position)
        if n == _CHUNK and find(_ZERO_CHUNK, position, position + n) == position:
            if record_zero:
                _add(runs, position, position + n, _ZERO)
        else:
            for off in range(position, position + n, BLOCK_SIZE):
                if find(_ZERO_BLOCK, off, off + BLOCK_SIZE) != off:
                    _add(runs, off, off + BLOCK_SIZE, _DATA)
                elif record_zero:
                    _add(runs, off, off + BLOCK_SIZE, _ZERO)
        position += n


def _scan_compare(mem: mmap.mmap, start: int, end: int, old: memoryview, runs: list[list[int]]) -> None:
    """Record the blocks of ``[start, end)`` that differ from ``old`` (the parent's bytes for that range)."""
    find, position = mem.find, start
    while position < end:
        n = min(_CHUNK, end - position)
        base = position - start
        if find(old[base : base + n], position, position + n) != position:
            for off in range(position, position + n, BLOCK_SIZE):
                rel = off - start
                if find(old[rel : rel + BLOCK_SIZE], off, off + BLOCK_SIZE) != off:
                    zero = find(_ZERO_BLOCK, off, off + BLOCK_SIZE) == off
                    _add(runs, off, off + BLOCK_SIZE, _ZERO if zero else _DATA)
        position += n


def _dirty_changes(source: _RawFile) -> list[list[int]]:
    runs: list[list[int]] = []
    for start, end in source.extents:
        _scan_zero(source.map, start, end, runs, record_zero=True)
    return runs


def _compared_changes(source: _RawFile, parent: Chain) -> list[list[int]]:
    runs: list[list[int]] = []
    for m in parent.header.mappings:
        if m.is_zero:  # unchanged unless the raw file holds non-zero data here; holes are zero
            for start, end in _clip(source.extents, m.offset, m.end):
                _scan_zero(source.map, start, end, runs, record_zero=False)
        else:
            old = parent.view(m.build_id)[m.storage_offset : m.storage_offset + m.length]
            _scan_compare(source.map, m.offset, m.end, old, runs)
    return runs


def _clip(extents: list[tuple[int, int]], start: int, end: int) -> Iterator[tuple[int, int]]:
    for s, e in extents:
        if e > start and s < end:
            yield max(s, start), min(e, end)


# -- packing ---------------------------------------------------------------------------------------------
def _pack(
    dest: Path, build: UUID, logical: Iterable[Mapping], sources: dict[UUID, tuple[int, memoryview]]
) -> tuple[list[Mapping], DiffFile | None]:
    """Copy the bytes of every non-zero mapping, in order, into ``build``'s new diff file.

    ``logical`` maps memory to ``sources`` (build -> fd and a view of it); the result maps the same ranges
    to the new file (zero mappings pass through). No file is created when there is nothing to store. The
    checksum is taken from the source views, whose pages the scans have just brought into the cache.
    """
    logical = list(logical)
    if all(m.is_zero for m in logical):
        return logical, None
    path = dest / diff_name(build)
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    hasher = xxhash.xxh3_128()
    try:
        packed, position = [], 0
        for group in _copy_groups(logical):
            first = group[0]
            length = sum(m.length for m in group)
            fd, view = sources[first.build_id]
            copy_range(fd, out, first.storage_offset, position, length)
            hasher.update(view[first.storage_offset : first.storage_offset + length])
            packed.extend(
                Mapping(m.offset, m.length, build, position + (m.offset - first.offset)) for m in group
            )
            position += length
    finally:
        os.close(out)
    zeros = [m for m in logical if m.is_zero]
    return normalize(sorted(packed + zeros)), DiffFile(build, position, hasher.digest())


def _copy_groups(logical: list[Mapping]) -> Iterator[list[Mapping]]:
    """Non-zero mappings grouped into runs that are contiguous both in memory and in one source."""
    group: list[Mapping] = []
    for m in logical:
        if m.is_zero:
            continue
        if group:
            last = group[-1]
            if (
                last.build_id == m.build_id
                and last.end == m.offset
                and last.storage_offset + last.length == m.storage_offset
            ):
                group.append(m)
                continue
            yield group
        group = [m]
    if group:
        yield group


def _fill_gaps(data: list[Mapping], size: int) -> list[Mapping]:
    out, position = [], 0
    for m in data:
        if m.offset > position:
            out.append(Mapping(position, m.offset - position, ZERO_BUILD, 0))
        out.append(m)
        position = m.end
    if position < size:
        out.append(Mapping(position, size - position, ZERO_BUILD, 0))
    return out


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
