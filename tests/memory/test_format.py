"""The header format: seed v1 bit-exact, v2 with checksums, validation, lookup, overlay, normalize."""

from __future__ import annotations

import itertools
import struct
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wrenbox.errors import CorruptData, InvalidArgument
from wrenbox.memory.format import (
    BLOCK_SIZE,
    MAGIC,
    ZERO_BUILD,
    DiffFile,
    Header,
    Location,
    Mapping,
    checksum,
    normalize,
    overlay,
    validate,
)

K = BLOCK_SIZE
B = UUID("6f1c2a4e-8d3b-4c5a-9e7f-0a1b2c3d4e5f")
D = UUID("0d9e8f7a-6b5c-4d3e-8f2a-1b0c9d8e7f6a")


def le64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def seed_entry(offset: int, length: int, build: UUID, storage: int) -> bytes:
    return le64(offset) + le64(length) + build.bytes + le64(storage)


def seed_metadata(size: int, generation: int, build: UUID, base: UUID) -> bytes:
    return le64(1) + le64(4096) + le64(size) + le64(generation) + build.bytes + base.bytes


# spec §2.4: 16 KiB guest, blocks 0, 2, 3 non-zero, block 1 zero, build B.
WORKED = (
    seed_metadata(16 * 1024, 0, B, B)
    + seed_entry(0, K, B, 0)
    + seed_entry(K, K, ZERO_BUILD, 0)
    + seed_entry(2 * K, 2 * K, B, K)
)


def test_seed_worked_example_decodes_and_reencodes_bit_exactly() -> None:
    assert len(WORKED) == 184
    header = Header.decode(WORKED)
    assert header.version == 1
    assert (header.size, header.generation, header.build_id, header.base_build_id) == (16384, 0, B, B)
    assert header.mappings == (
        Mapping(0, K, B, 0),
        Mapping(K, K, ZERO_BUILD, 0),
        Mapping(2 * K, 2 * K, B, K),
    )
    assert header.encode() == WORKED
    assert header.files == ()


def test_seed_diff_example_and_lookup() -> None:
    # spec §2.5: generation 1, build D dirties blocks 1 and 3.
    data = (
        seed_metadata(16384, 1, D, B)
        + seed_entry(0, K, B, 0)
        + seed_entry(K, K, D, 0)
        + seed_entry(2 * K, K, B, K)
        + seed_entry(3 * K, K, D, K)
    )
    header = Header.decode(data)
    assert header.lookup(0) == Location(B, 0, K)
    assert header.lookup(K + 100) == Location(D, 100, K - 100)
    assert header.lookup(3 * K) == Location(D, K, K)
    assert header.lookup(16383) == Location(D, 2 * K - 1, 1)
    assert header.builds == [B, D]
    assert header.encode(version=1) == data
    for bad in (-1, 16384, 1 << 40):
        with pytest.raises(InvalidArgument, match="outside"):
            header.lookup(bad)


def test_seed_header_without_entries_implies_one_entry() -> None:
    header = Header.decode(seed_metadata(8 * K, 0, B, B))
    assert header.mappings == (Mapping(0, 8 * K, B, 0),)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (WORKED[:63], "too short"),
        (WORKED + b"\0" * 17, "truncated mapping"),
        (WORKED[:-1], "truncated mapping"),
        (le64(7) + WORKED[8:], "not a memory snapshot header"),
        (b"", "too short"),
        # a gap: [0,4K) then [8K,16K)
        (
            seed_metadata(16384, 0, B, B) + seed_entry(0, K, B, 0) + seed_entry(2 * K, 2 * K, B, K),
            "contiguous",
        ),
        # overlap
        (
            seed_metadata(16384, 0, B, B) + seed_entry(0, 2 * K, B, 0) + seed_entry(K, 3 * K, B, K),
            "contiguous",
        ),
        # not covering the whole size
        (seed_metadata(16384, 0, B, B) + seed_entry(0, K, B, 0), "cover"),
        # unaligned length
        (seed_metadata(16384, 0, B, B) + seed_entry(0, 100, B, 0), "block-aligned"),
        # unaligned storage offset
        (seed_metadata(16384, 0, B, B) + seed_entry(0, 16384, B, 7), "storage offset"),
        # size not a multiple of the block size
        (le64(1) + le64(4096) + le64(5000) + le64(0) + B.bytes + B.bytes, "multiple of the block size"),
        # block size not a power of two
        (le64(1) + le64(3000) + le64(6000) + le64(0) + B.bytes + B.bytes, "power of two"),
    ],
)
def test_bad_seed_headers_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(CorruptData, match=message):
        Header.decode(data)


def v2_header() -> Header:
    return Header(
        16384,
        1,
        D,
        B,
        (Mapping(0, K, B, 0), Mapping(K, K, D, 0), Mapping(2 * K, K, ZERO_BUILD, 0), Mapping(3 * K, K, D, K)),
        (DiffFile(B, K, checksum(b"b")), DiffFile(D, 2 * K, checksum(b"d"))),
    )


def test_v2_layout() -> None:
    header = v2_header()
    data = header.encode()
    assert len(data) == 104 + 40 * (4 + 2)
    assert data[:8] == MAGIC == b"WRNBXMEM"
    version, block, size, gen = struct.unpack_from("<QQQQ", data, 8)
    assert (version, block, size, gen) == (2, 4096, 16384, 1)
    assert data[40:56] == D.bytes
    assert data[56:72] == B.bytes
    assert struct.unpack_from("<QQ", data, 72) == (4, 2)
    assert data[88 : 88 + 40] == seed_entry(0, K, B, 0)
    assert data[88 + 160 : 88 + 160 + 16] == B.bytes
    assert data[-16:] == checksum(data[:-16])
    assert Header.decode(data) == header


def test_v2_every_flipped_byte_and_every_truncation_is_detected() -> None:
    data = v2_header().encode()
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0x40
        with pytest.raises(CorruptData):
            Header.decode(bytes(damaged))
    for n in range(len(data)):
        with pytest.raises(CorruptData):
            Header.decode(data[:n])
    with pytest.raises(CorruptData):
        Header.decode(data + b"\0")


def test_v2_counts_must_match_length_even_with_valid_checksum() -> None:
    body = bytearray(v2_header().encode()[:-16])
    struct.pack_into("<QQ", body, 72, 5, 2)
    with pytest.raises(CorruptData, match="does not match"):
        Header.decode(bytes(body) + checksum(bytes(body)))


def test_v2_needs_exactly_the_referenced_files() -> None:
    maps = (Mapping(0, K, B, 0), Mapping(K, K, D, 0))
    with pytest.raises(InvalidArgument, match="exactly the builds"):
        Header(2 * K, 1, D, B, maps, (DiffFile(B, K, checksum(b"")),))
    with pytest.raises(InvalidArgument, match="exactly the builds"):
        Header(
            2 * K,
            1,
            D,
            B,
            (*maps[:1], Mapping(K, K, ZERO_BUILD, 0)),
            (
                DiffFile(B, K, checksum(b"")),
                DiffFile(D, K, checksum(b"")),
            ),
        )
    with pytest.raises(InvalidArgument, match="past the end"):
        Header(2 * K, 1, D, B, maps, (DiffFile(B, K, checksum(b"")), DiffFile(D, K - 1, checksum(b""))))
    # version 1 headers cannot carry a file table
    with pytest.raises(InvalidArgument):
        Header(
            2 * K, 1, D, B, maps, (DiffFile(B, K, checksum(b"")), DiffFile(D, K, checksum(b""))), version=1
        )


def test_v1_header_converts_to_v2_only_with_file_table() -> None:
    header = Header.decode(WORKED)
    with pytest.raises(InvalidArgument, match="length and checksum"):
        header.encode(version=2)


def test_validate_errors() -> None:
    with pytest.raises(InvalidArgument, match="no mappings"):
        validate([], 4096)
    with pytest.raises(InvalidArgument, match="contiguous"):
        validate([Mapping(K, K, B, 0)], 2 * K)
    with pytest.raises(InvalidArgument, match="block-aligned"):
        validate([Mapping(0, 0, B, 0), Mapping(0, K, B, 0)], K)


def test_normalize_merges_only_storage_contiguous_neighbours() -> None:
    maps = [
        Mapping(0, K, B, 0),
        Mapping(K, K, B, K),  # contiguous in storage: merges
        Mapping(2 * K, K, B, 5 * K),  # same build, not contiguous in storage: stays
        Mapping(3 * K, K, ZERO_BUILD, 0),
        Mapping(4 * K, K, ZERO_BUILD, 123),  # zero: storage offset means nothing, merges
        Mapping(5 * K, K, D, 6 * K),  # different build right after B@6K: stays
    ]
    assert normalize(maps) == [
        Mapping(0, 2 * K, B, 0),
        Mapping(2 * K, K, B, 5 * K),
        Mapping(3 * K, 2 * K, ZERO_BUILD, 0),
        Mapping(5 * K, K, D, 6 * K),
    ]


def test_overlay_spec_example() -> None:
    base = [Mapping(0, K, B, 0), Mapping(K, K, ZERO_BUILD, 0), Mapping(2 * K, 2 * K, B, K)]
    top = [Mapping(K, K, D, 0), Mapping(3 * K, K, D, K)]
    assert normalize(overlay(base, top)) == [
        Mapping(0, K, B, 0),
        Mapping(K, K, D, 0),
        Mapping(2 * K, K, B, K),
        Mapping(3 * K, K, D, K),
    ]


def test_overlay_strictly_inside_shifts_storage() -> None:
    base = [Mapping(0, 10 * K, B, 100 * K)]
    top = [Mapping(3 * K, 2 * K, D, 0)]
    assert overlay(base, top) == [
        Mapping(0, 3 * K, B, 100 * K),
        Mapping(3 * K, 2 * K, D, 0),
        Mapping(5 * K, 5 * K, B, 105 * K),
    ]


@pytest.mark.parametrize(
    "top",
    [
        [Mapping(2 * K, K, D, 0), Mapping(K, K, D, 0)],  # unsorted
        [Mapping(0, 2 * K, D, 0), Mapping(K, K, D, 0)],  # overlapping
        [Mapping(3 * K, 2 * K, D, 0)],  # beyond the end
        [Mapping(0, 0, D, 0)],  # empty
    ],
)
def test_overlay_refuses_bad_tops(top: list[Mapping]) -> None:
    with pytest.raises(InvalidArgument):
        overlay([Mapping(0, 4 * K, B, 0)], top)


# -- property tests: a per-block model ----------------------------------------------------------------------
BUILDS = [ZERO_BUILD, B, D, UUID(int=77)]


@st.composite
def partitions(draw: st.DrawFn, blocks: int, *, cover: bool) -> list[Mapping]:
    """Random sorted mappings over ``blocks`` blocks (covering them all, or with random gaps)."""
    cuts = sorted(draw(st.sets(st.integers(1, blocks - 1), max_size=blocks - 1))) if blocks > 1 else []
    bounds = [0, *cuts, blocks]
    out = []
    for lo, hi in itertools.pairwise(bounds):
        if not cover and draw(st.booleans()):
            continue
        build = draw(st.sampled_from(BUILDS))
        storage = 0 if build == ZERO_BUILD else draw(st.integers(0, 64)) * K
        out.append(Mapping(lo * K, (hi - lo) * K, build, storage))
    return out


def model(mappings: list[Mapping]) -> dict[int, tuple[UUID, int]]:
    """Block index -> (build, storage offset of that block); zero blocks have storage 0."""
    out = {}
    for m in mappings:
        for i in range(m.length // K):
            out[m.offset // K + i] = (m.build_id, 0 if m.is_zero else m.storage_offset + i * K)
    return out


scenario = st.integers(1, 40).flatmap(
    lambda n: st.tuples(st.just(n), partitions(n, cover=True), partitions(n, cover=False))
)


@settings(max_examples=300, deadline=None)
@given(scenario)
def test_overlay_matches_block_model(case: tuple[int, list[Mapping], list[Mapping]]) -> None:
    blocks, base, top = case
    result = overlay(base, top)
    validate(result, blocks * K)
    expected = model(base) | model(top)
    assert model(result) == expected
    assert model(normalize(result)) == expected


@settings(max_examples=300, deadline=None)
@given(scenario)
def test_normalize_is_lossless_and_maximal(case: tuple[int, list[Mapping], list[Mapping]]) -> None:
    blocks, base, _ = case
    merged = normalize(base)
    validate(merged, blocks * K)
    assert model(merged) == model(base)
    assert normalize(merged) == merged
    for a, b in itertools.pairwise(merged):
        contiguous = a.is_zero or a.storage_offset + a.length == b.storage_offset
        assert not (a.build_id == b.build_id and contiguous)


@settings(max_examples=300, deadline=None)
@given(scenario, st.data())
def test_lookup_matches_linear_scan(
    case: tuple[int, list[Mapping], list[Mapping]], data: st.DataObject
) -> None:
    blocks, base, _ = case
    files = tuple(
        DiffFile(b, 1 << 30, checksum(b""))
        for b in dict.fromkeys(m.build_id for m in base)
        if b != ZERO_BUILD
    )
    header = Header(blocks * K, 0, B, B, tuple(base), files)
    for _ in range(20):
        offset = data.draw(st.integers(0, blocks * K - 1))
        m = next(m for m in base if m.offset <= offset < m.end)
        assert header.lookup(offset) == Location(
            m.build_id, m.storage_offset + offset - m.offset, m.end - offset
        )
    # both encodings round-trip
    assert Header.decode(header.encode()) == header
    v1 = Header.decode(header.encode(version=1))
    assert v1.mappings == header.mappings
    assert v1.version == 1
