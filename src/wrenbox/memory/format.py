"""The memory snapshot header: a map from guest-memory offsets to the diff files that hold them.

A memory snapshot is one header plus one packed *diff file* per generation ("build") still referenced.
The header maps every block of guest memory ``[0, size)`` either to a range inside some build's diff file
or to the zero build (all-zero memory, stored nowhere).

Two encodings, both little-endian:

**Version 1** (the seed's, read and written bit-exactly): 64 bytes of metadata, then 40-byte mapping
entries until end of file; no entries means one implied entry ``{0, size, build_id, 0}``::

    metadata  0 u64 version (1) | 8 u64 block_size | 16 u64 size | 24 u64 generation
              32 16B build_id  | 48 16B base_build_id                          (UUIDs in RFC 4122 byte order)
    mapping   0 u64 offset | 8 u64 length | 16 16B build_id (zero UUID = zero block) | 32 u64 storage_offset

**Version 2** (what wrenbox writes) adds what v1 lacks to detect damage: a magic, counts, the length and
checksum of every diff file, and a checksum of the header itself::

    0        8B   magic b"WRNBXMEM"
    8        64B  metadata, laid out as in v1 (version = 2)
    72       u64  mapping count n (>= 1)
    80       u64  file count k
    88       40B  x n mappings, laid out as in v1
    88+40n   40B  x k files: 16B build_id | u64 length | 16B xxh3-128 digest of the whole file
    end-16   16B  xxh3-128 digest of every byte before it

The checksum is xxh3-128: measured here at 12.5 GB/s against 2.2 GB/s for zlib's crc32 and 1.1 GB/s for
sha256 (SHA-NI), so verifying a diff costs a fraction of reading it. It detects corruption, not
tampering; the snapshot directory is as trusted as the rest of the data dir.

Mappings are sorted, contiguous, block-aligned and cover ``[0, size)`` exactly; :func:`validate` checks
that, :func:`overlay` puts a newer generation's mappings over an older one, :func:`normalize` merges
neighbours (only when they really are contiguous in storage), and :meth:`Header.lookup` bisects.
"""

from __future__ import annotations

import bisect
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from uuid import UUID

import xxhash

from wrenbox.errors import CorruptData, InvalidArgument, NotFound

__all__ = [
    "BLOCK_SIZE",
    "HEADER_NAME",
    "MAGIC",
    "ZERO_BUILD",
    "DiffFile",
    "Header",
    "Location",
    "Mapping",
    "checksum",
    "diff_name",
    "new_build_id",
    "normalize",
    "overlay",
    "validate",
]

BLOCK_SIZE = 4096
ZERO_BUILD = UUID(int=0)
MAGIC = b"WRNBXMEM"
HEADER_NAME = "memfile.header"

_METADATA = struct.Struct("<QQQQ16s16s")
_ENTRY = struct.Struct("<QQ16sQ")
_COUNTS = struct.Struct("<QQ")
_FILE = struct.Struct("<16sQ16s")
_DIGEST_SIZE = 16
_V2_FIXED = len(MAGIC) + _METADATA.size + _COUNTS.size


def diff_name(build_id: UUID) -> str:
    """File name of a build's diff inside a snapshot directory (canonical lower-case UUID text)."""
    return f"memfile.{build_id}"


def checksum(data: bytes | memoryview) -> bytes:
    """The digest used for headers and diff files (xxh3-128, 16 bytes)."""
    return xxhash.xxh3_128_digest(data)


class Mapping(NamedTuple):
    """Guest memory ``[offset, offset + length)`` is stored in ``build_id``'s diff at ``storage_offset``."""

    offset: int
    length: int
    build_id: UUID
    storage_offset: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def is_zero(self) -> bool:
        return self.build_id == ZERO_BUILD

    def slice(self, start: int, end: int) -> Mapping:
        """The part of this mapping covering ``[start, end)`` (which must lie inside it)."""
        return Mapping(start, end - start, self.build_id, self.storage_offset + (start - self.offset))


class Location(NamedTuple):
    """Answer of a lookup: where the byte at the asked offset lives, and for how long that stays so."""

    build_id: UUID
    storage_offset: int
    length: int
    """Bytes from the asked offset to the end of its mapping (the run that can be read in one go)."""

    @property
    def is_zero(self) -> bool:
        return self.build_id == ZERO_BUILD


class DiffFile(NamedTuple):
    """The recorded length and checksum of one build's diff file."""

    build_id: UUID
    length: int
    checksum: bytes


@dataclass(frozen=True)
class Header:
    """One generation of a memory snapshot. Constructing one validates it (InvalidArgument if wrong)."""

    size: int
    generation: int
    build_id: UUID
    base_build_id: UUID
    mappings: tuple[Mapping, ...]
    files: tuple[DiffFile, ...] = ()
    """Length and checksum of every referenced diff file (always for version 2; empty for version 1)."""
    block_size: int = BLOCK_SIZE
    version: int = 2
    _starts: list[int] = field(init=False, repr=False, compare=False)
    _builds: tuple[UUID, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise InvalidArgument(f"unsupported header version {self.version}")
        validate(self.mappings, self.size, self.block_size)
        used = dict.fromkeys(m.build_id for m in self.mappings)
        used.pop(ZERO_BUILD, None)
        object.__setattr__(self, "_builds", tuple(used))
        object.__setattr__(self, "_starts", [m.offset for m in self.mappings])
        _validate_files(self)

    @property
    def builds(self) -> list[UUID]:
        """Every build whose diff file this header references, in order of first use."""
        return list(self._builds)

    def file(self, build_id: UUID) -> DiffFile | None:
        """The recorded length and checksum of a build's diff (None for version 1 headers)."""
        return next((f for f in self.files if f.build_id == build_id), None)

    def lookup(self, offset: int) -> Location:
        """Where guest memory byte ``offset`` is stored, found by bisection."""
        if not 0 <= offset < self.size:
            raise InvalidArgument(f"offset {offset} is outside guest memory [0, {self.size})")
        m = self.mappings[bisect.bisect_right(self._starts, offset) - 1]
        delta = offset - m.offset
        return Location(m.build_id, m.storage_offset + delta, m.length - delta)

    def encode(self, version: int | None = None) -> bytes:
        """The header's bytes in ``version`` (default: its own version)."""
        version = self.version if version is None else version
        entries = b"".join(
            _ENTRY.pack(m.offset, m.length, m.build_id.bytes, m.storage_offset) for m in self.mappings
        )
        meta = _METADATA.pack(
            version,
            self.block_size,
            self.size,
            self.generation,
            self.build_id.bytes,
            self.base_build_id.bytes,
        )
        if version == 1:
            return meta + entries
        if version != 2:
            raise InvalidArgument(f"unsupported header version {version}")
        if {f.build_id for f in self.files} != set(self.builds):
            raise InvalidArgument("a version 2 header needs the length and checksum of every referenced diff")
        files = b"".join(_FILE.pack(f.build_id.bytes, f.length, f.checksum) for f in self.files)
        body = MAGIC + meta + _COUNTS.pack(len(self.mappings), len(self.files)) + entries + files
        return body + checksum(body)

    @classmethod
    def decode(cls, data: bytes, *, source: str = "header") -> Header:
        """Parse either version; anything damaged, truncated or inconsistent raises CorruptData."""
        try:
            if data[: len(MAGIC)] == MAGIC:
                return _decode_v2(data, source)
            return _decode_v1(data, source)
        except InvalidArgument as exc:
            raise CorruptData(f"{source}: {exc.message}") from exc

    @classmethod
    def read(cls, path: Path) -> Header:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no memory snapshot header at {path}") from None
        return cls.decode(data, source=str(path))


def _decode_v1(data: bytes, source: str) -> Header:
    if len(data) < _METADATA.size:
        raise CorruptData(f"{source}: {len(data)} bytes is too short for a memory snapshot header")
    version, block_size, size, generation, build, base = _METADATA.unpack_from(data)
    if version != 1:
        raise CorruptData(f"{source}: not a memory snapshot header (no magic, version field {version})")
    body = len(data) - _METADATA.size
    if body % _ENTRY.size:
        raise CorruptData(f"{source}: truncated mapping entry ({body % _ENTRY.size} trailing bytes)")
    mappings = _entries(data, _METADATA.size, body // _ENTRY.size)
    if not mappings:
        mappings = (Mapping(0, size, UUID(bytes=build), 0),)
    return Header(size, generation, UUID(bytes=build), UUID(bytes=base), mappings, (), block_size, 1)


def _decode_v2(data: bytes, source: str) -> Header:
    if len(data) < _V2_FIXED + _DIGEST_SIZE:
        raise CorruptData(f"{source}: truncated header ({len(data)} bytes)")
    body, digest = data[:-_DIGEST_SIZE], data[-_DIGEST_SIZE:]
    if checksum(body) != digest:
        raise CorruptData(f"{source}: header checksum mismatch")
    version, block_size, size, generation, build, base = _METADATA.unpack_from(data, len(MAGIC))
    if version != 2:
        raise CorruptData(f"{source}: unsupported header version {version}")
    n_maps, n_files = _COUNTS.unpack_from(data, len(MAGIC) + _METADATA.size)
    if len(body) != _V2_FIXED + _ENTRY.size * (n_maps + n_files):
        raise CorruptData(f"{source}: header length does not match its {n_maps} mappings and {n_files} files")
    mappings = _entries(data, _V2_FIXED, n_maps)
    first_file = _V2_FIXED + n_maps * _ENTRY.size
    files = []
    for i in range(n_files):
        raw_id, length, digest_ = _FILE.unpack_from(data, first_file + i * _FILE.size)
        files.append(DiffFile(UUID(bytes=raw_id), length, digest_))
    return Header(
        size, generation, UUID(bytes=build), UUID(bytes=base), mappings, tuple(files), block_size, 2
    )


def _entries(data: bytes, at: int, count: int) -> tuple[Mapping, ...]:
    ids: dict[bytes, UUID] = {}  # a header names few builds many times; build each UUID once
    return tuple(
        Mapping(offset, length, ids.get(raw_id) or ids.setdefault(raw_id, UUID(bytes=raw_id)), storage)
        for offset, length, raw_id, storage in _ENTRY.iter_unpack(data[at : at + count * _ENTRY.size])
    )


def _validate_files(header: Header) -> None:
    if header.version == 1:
        if header.files:
            raise InvalidArgument("version 1 headers carry no diff file table")
        return
    by_id = {f.build_id: f for f in header.files}
    if len(by_id) != len(header.files):
        raise InvalidArgument("a diff file is listed twice")
    referenced = set(header.builds)
    if set(by_id) != referenced:
        raise InvalidArgument("the diff file table does not list exactly the builds the mappings use")
    lengths = {f.build_id: f.length for f in header.files}
    for offset, length, build, storage in header.mappings:
        if storage + length > lengths.get(build, storage + length):  # zero mappings have no file
            raise InvalidArgument(f"mapping at {offset} reads past the end of the diff of {build}")
    for f in header.files:
        if len(f.checksum) != _DIGEST_SIZE:
            raise InvalidArgument(f"checksum of {f.build_id} is not {_DIGEST_SIZE} bytes")


def validate(mappings: Sequence[Mapping], size: int, block_size: int = BLOCK_SIZE) -> None:
    """Raise InvalidArgument unless ``mappings`` are sorted, contiguous, block-aligned and cover [0, size)."""
    if block_size < 512 or block_size & (block_size - 1):
        raise InvalidArgument(f"block size {block_size} is not a power of two >= 512")
    if size <= 0 or size % block_size:
        raise InvalidArgument(f"memory size {size} is not a positive multiple of the block size {block_size}")
    if not mappings:
        raise InvalidArgument("no mappings")
    position, mask = 0, block_size - 1
    for offset, length, build, storage in mappings:
        if offset != position:
            raise InvalidArgument(f"mappings are not contiguous at {position} (next starts at {offset})")
        if length <= 0 or (offset | length) & mask:
            raise InvalidArgument(f"mapping at {offset} (length {length}) is not block-aligned")
        if (storage < 0 or storage & mask) and build != ZERO_BUILD:
            raise InvalidArgument(f"mapping at {offset} has unaligned storage offset {storage}")
        position = offset + length
    if position != size:
        raise InvalidArgument(f"mappings cover [0, {position}), not [0, {size})")


def overlay(base: Sequence[Mapping], top: Iterable[Mapping]) -> list[Mapping]:
    """``base`` with ``top`` laid over it: each byte resolves to ``top`` where it has an entry, else ``base``.

    ``base`` must cover a contiguous range; ``top`` is sorted and non-overlapping inside that range (gaps
    allowed). The result is sorted and contiguous but not normalized.
    """
    top = list(top)
    lo, hi = (base[0].offset, base[-1].end) if base else (0, 0)
    previous_end = lo
    for t in top:
        if t.length <= 0 or t.offset < previous_end or t.end > hi:
            raise InvalidArgument(
                f"overlay entry [{t.offset}, {t.end}) is unsorted, overlapping or out of range"
            )
        previous_end = t.end
    kept: list[Mapping] = []
    j = 0
    for b in base:
        start = b.offset
        while start < b.end:
            while j < len(top) and top[j].end <= start:
                j += 1
            if j == len(top) or top[j].offset >= b.end:
                kept.append(b.slice(start, b.end))
                break
            if top[j].offset > start:
                kept.append(b.slice(start, top[j].offset))
            start = top[j].end
    return sorted(kept + top)


def normalize(mappings: Iterable[Mapping]) -> list[Mapping]:
    """Merge neighbours that are adjacent in memory, of the same build and adjacent in storage too."""
    out: list[Mapping] = []
    for m in mappings:
        if out:
            prev = out[-1]
            if (
                prev.end == m.offset
                and prev.build_id == m.build_id
                and (m.is_zero or prev.storage_offset + prev.length == m.storage_offset)
            ):
                out[-1] = Mapping(prev.offset, prev.length + m.length, prev.build_id, prev.storage_offset)
                continue
        out.append(m)
    return out


def new_build_id() -> UUID:
    """A fresh random build id (UUIDv4, like the seed)."""
    return uuid.uuid4()
