"""FileSource: a raw memory file seen as data extents (straight from the page cache) and zero extents."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from wrenbox.errors import CorruptData, InvalidArgument
from wrenbox.memory.uffd import Extent, FileSource, PageSource

K = 1024


@pytest.fixture
def memfile(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    """64 KiB: data [0, 8K), hole [8K, 24K), data [24K, 28K), hole to the end."""
    path = tmp_path / "memfile"
    first, second = os.urandom(8 * K), os.urandom(4 * K)
    with open(path, "wb") as f:
        f.truncate(64 * K)
        f.write(first)
        f.seek(24 * K)
        f.write(second)
    return path, first, second


def test_extents_cover_the_range_with_data_and_zeros(memfile):
    path, first, second = memfile
    with FileSource(path) as source:
        assert isinstance(source, PageSource)
        assert source.size == 64 * K
        assert source.data_bytes == 12 * K
        extents = source.extents(0, 64 * K)
        assert [(e.offset, e.length, e.address is None) for e in extents] == [
            (0, 8 * K, False),
            (8 * K, 16 * K, True),
            (24 * K, 4 * K, False),
            (28 * K, 36 * K, True),
        ]
        assert ctypes.string_at(extents[0].address, 8 * K) == first
        assert ctypes.string_at(extents[2].address, 4 * K) == second


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (4 * K, 8 * K, [(4 * K, 4 * K, False), (8 * K, 4 * K, True)]),
        (12 * K, 4 * K, [(12 * K, 4 * K, True)]),
        (20 * K, 12 * K, [(20 * K, 4 * K, True), (24 * K, 4 * K, False), (28 * K, 4 * K, True)]),
        (60 * K, 4 * K, [(60 * K, 4 * K, True)]),
        (24 * K, 4 * K, [(24 * K, 4 * K, False)]),
    ],
)
def test_extents_of_a_part(memfile, offset, length, expected):
    path, first, second = memfile
    with FileSource(path) as source:
        extents = source.extents(offset, length)
        assert [(e.offset, e.length, e.address is None) for e in extents] == expected
        data = b"".join(
            bytes(e.length) if e.address is None else ctypes.string_at(e.address, e.length) for e in extents
        )
        whole = first + bytes(16 * K) + second + bytes(36 * K)
        assert data == whole[offset : offset + length]


@pytest.mark.parametrize(
    ("offset", "length"), [(-4 * K, 4 * K), (0, 0), (100, 4 * K), (0, 100), (60 * K, 8 * K)]
)
def test_bad_ranges_are_refused(memfile, offset, length):
    with FileSource(memfile[0]) as source, pytest.raises(InvalidArgument):
        source.extents(offset, length)


def test_a_dense_file_is_one_extent(tmp_path):
    path = tmp_path / "dense"
    path.write_bytes(os.urandom(32 * K))
    with FileSource(path) as source:
        assert source.extents(0, 32 * K) == [Extent(0, 32 * K, source.extents(0, 4 * K)[0].address)]


@pytest.mark.parametrize("size", [0, 4 * K + 1])
def test_files_that_cannot_be_memory_are_refused(tmp_path, size):
    path = tmp_path / "odd"
    path.write_bytes(b"x" * size)
    before = len(list(Path("/proc/self/fd").iterdir()))
    with pytest.raises(CorruptData):
        FileSource(path)
    assert len(list(Path("/proc/self/fd").iterdir())) == before


def test_close_unmaps_the_file(memfile):
    source = FileSource(memfile[0])
    maps = Path("/proc/self/maps")
    assert str(memfile[0]) in maps.read_text()
    source.close()
    assert str(memfile[0]) not in maps.read_text()
