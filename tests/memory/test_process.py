"""Full / Diff processing, the generation cap, and the round trip raw -> snapshot chain -> materialized."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wrenbox.errors import InvalidArgument, NotFound
from wrenbox.memory.chain import Chain
from wrenbox.memory.format import HEADER_NAME, ZERO_BUILD, Header, Mapping, checksum, diff_name
from wrenbox.memory.process import MemoryConfig, RawKind, collapse, process_diff, process_full

K = 4096


def block(tag: int) -> bytes:
    """A recognisable non-zero block for tag > 0, the zero block for tag 0."""
    return bytes(K) if tag == 0 else tag.to_bytes(2, "little") * (K // 2)


def image(*tags: int) -> bytes:
    return b"".join(block(t) for t in tags)


def write_sparse(path: Path, size: int, blocks: dict[int, bytes]) -> None:
    """A Firecracker-style Diff memfile: full size, only ``blocks`` written (allocated), the rest holes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for index, data in blocks.items():
            os.pwrite(fd, data, index * K)
    finally:
        os.close(fd)


def files_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def new_dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def test_full_worked_example(tmp_path: Path) -> None:
    # spec §2.4: blocks 0, 2, 3 non-zero, block 1 zero: the diff holds 0, 2, 3 in order.
    memory = image(1, 0, 2, 3)
    (tmp_path / "raw").write_bytes(memory)
    dest = new_dir(tmp_path, "s0")
    header = process_full(tmp_path / "raw", dest)
    b = header.build_id
    assert (header.generation, header.base_build_id, header.size) == (0, b, 4 * K)
    assert header.mappings == (Mapping(0, K, b, 0), Mapping(K, K, ZERO_BUILD, 0), Mapping(2 * K, 2 * K, b, K))
    assert (dest / diff_name(b)).read_bytes() == image(1, 2, 3)
    assert files_in(dest) == {HEADER_NAME, diff_name(b)}
    assert len(header.encode(version=1)) == 184
    assert (tmp_path / "raw").read_bytes() == memory  # input untouched


def test_full_skips_holes_and_written_zeros(tmp_path: Path) -> None:
    write_sparse(tmp_path / "raw", 300 * K, {3: block(5), 4: bytes(K), 200: block(6), 299: block(7)})
    dest = new_dir(tmp_path, "s0")
    header = process_full(tmp_path / "raw", dest)
    assert (dest / diff_name(header.build_id)).read_bytes() == image(5, 6, 7)
    with Chain.open(dest) as chain:
        assert chain.read(0, 300 * K) == (tmp_path / "raw").read_bytes()


def test_all_zero_memory_stores_nothing(tmp_path: Path) -> None:
    write_sparse(tmp_path / "raw", 40 * K, {7: bytes(K)})
    dest = new_dir(tmp_path, "s0")
    header = process_full(tmp_path / "raw", dest)
    assert header.mappings == (Mapping(0, 40 * K, ZERO_BUILD, 0),)
    assert header.files == ()
    assert files_in(dest) == {HEADER_NAME}


def test_diff_worked_example(tmp_path: Path) -> None:
    # spec §2.5: generation 1 dirties blocks 1 and 3.
    (tmp_path / "raw0").write_bytes(image(1, 0, 2, 3))
    s0, s1 = new_dir(tmp_path, "s0"), new_dir(tmp_path, "s1")
    b = process_full(tmp_path / "raw0", s0).build_id
    (tmp_path / "raw1").write_bytes(image(1, 8, 2, 9))
    with Chain.open(s0) as parent:
        header = process_diff(tmp_path / "raw1", parent, s1)
    d = header.build_id
    assert (header.generation, header.base_build_id) == (1, b)
    assert header.mappings == (
        Mapping(0, K, b, 0),
        Mapping(K, K, d, 0),
        Mapping(2 * K, K, b, K),
        Mapping(3 * K, K, d, K),
    )
    assert (s1 / diff_name(d)).read_bytes() == image(8, 9)
    assert files_in(s1) == {HEADER_NAME, diff_name(b), diff_name(d)}
    assert (s1 / diff_name(b)).stat().st_ino == (s0 / diff_name(b)).stat().st_ino  # linked, not copied


@pytest.mark.parametrize("kind", [RawKind.FULL, RawKind.SPARSE_DIFF])
def test_a_page_zeroed_by_the_guest_reads_zero(tmp_path: Path, kind: RawKind) -> None:
    # The seed's "zero means unchanged" heuristic would bring block 2's old content back.
    (tmp_path / "raw0").write_bytes(image(1, 2, 3, 4))
    s0, s1 = new_dir(tmp_path, "s0"), new_dir(tmp_path, "s1")
    process_full(tmp_path / "raw0", s0)
    if kind is RawKind.FULL:
        (tmp_path / "raw1").write_bytes(image(1, 2, 0, 4))
    else:
        write_sparse(tmp_path / "raw1", 4 * K, {2: bytes(K)})
    with Chain.open(s0) as parent:
        header = process_diff(tmp_path / "raw1", parent, s1, kind=kind)
    assert header.lookup(2 * K).is_zero
    assert header.files[0].build_id != header.build_id  # nothing new stored: a zero mapping is enough
    with Chain.open(s1) as chain:
        assert chain.read(0, 4 * K) == image(1, 2, 0, 4)


def test_sparse_diff_holes_are_unchanged_and_written_pages_are_changes(tmp_path: Path) -> None:
    (tmp_path / "raw0").write_bytes(image(1, 0, 3, 4, 5))
    s0, s1 = new_dir(tmp_path, "s0"), new_dir(tmp_path, "s1")
    process_full(tmp_path / "raw0", s0)
    # block 1 written with data, block 3 written with zeros, block 4 rewritten with the same bytes
    write_sparse(tmp_path / "raw1", 5 * K, {1: block(9), 3: bytes(K), 4: block(5)})
    with Chain.open(s0) as parent:
        header = process_diff(tmp_path / "raw1", parent, s1, kind=RawKind.SPARSE_DIFF)
    with Chain.open(s1) as chain:
        assert chain.read(0, 5 * K) == image(1, 9, 3, 0, 5)
        assert (s1 / diff_name(header.build_id)).read_bytes() == image(9, 5)


def test_compare_stores_only_what_changed(tmp_path: Path) -> None:
    blocks = [i % 7 for i in range(64)]
    (tmp_path / "raw0").write_bytes(image(*blocks))
    s0, s1 = new_dir(tmp_path, "s0"), new_dir(tmp_path, "s1")
    process_full(tmp_path / "raw0", s0)
    blocks[10], blocks[11], blocks[50], blocks[7] = 100, 101, 102, 3  # block 7 was 0: now data
    blocks[20] = 20 % 7  # rewritten with the same value: not a change
    (tmp_path / "raw1").write_bytes(image(*blocks))
    with Chain.open(s0) as parent:
        header = process_diff(tmp_path / "raw1", parent, s1)
    assert (s1 / diff_name(header.build_id)).read_bytes() == image(3, 100, 101, 102)


def test_unchanged_memory_writes_no_new_diff(tmp_path: Path) -> None:
    (tmp_path / "raw").write_bytes(image(1, 2, 0, 3))
    s0, s1 = new_dir(tmp_path, "s0"), new_dir(tmp_path, "s1")
    h0 = process_full(tmp_path / "raw", s0)
    with Chain.open(s0) as parent:
        h1 = process_diff(tmp_path / "raw", parent, s1)
    assert h1.mappings == h0.mappings
    assert h1.generation == 1
    assert files_in(s1) == {HEADER_NAME, diff_name(h0.build_id)}


def test_fully_overwritten_generations_are_not_carried(tmp_path: Path) -> None:
    (tmp_path / "raw0").write_bytes(image(1, 2))
    dirs = [new_dir(tmp_path, f"s{i}") for i in range(3)]
    g0 = process_full(tmp_path / "raw0", dirs[0])
    (tmp_path / "raw1").write_bytes(image(1, 3))
    with Chain.open(dirs[0]) as parent:
        g1 = process_diff(tmp_path / "raw1", parent, dirs[1])
    (tmp_path / "raw2").write_bytes(image(1, 4))
    with Chain.open(dirs[1]) as parent:
        g2 = process_diff(tmp_path / "raw2", parent, dirs[2])
    assert files_in(dirs[2]) == {HEADER_NAME, diff_name(g0.build_id), diff_name(g2.build_id)}
    assert g1.build_id not in g2.builds


def test_generation_cap_collapses_into_one_file(tmp_path: Path) -> None:
    config = MemoryConfig(max_generations=3)
    blocks = [1, 0, 2, 3, 0, 4]
    (tmp_path / "raw").write_bytes(image(*blocks))
    previous = new_dir(tmp_path, "s0")
    process_full(tmp_path / "raw", previous)
    generations = []
    for step in range(1, 7):
        blocks[step % 6] = 10 + step
        blocks[(step + 2) % 6] = 0
        (tmp_path / "raw").write_bytes(image(*blocks))
        current = new_dir(tmp_path, f"s{step}")
        with Chain.open(previous) as parent:
            header = process_diff(tmp_path / "raw", parent, current, config=config)
        generations.append(header.generation)
        with Chain.open(current) as chain:
            assert chain.read(0, 6 * K) == image(*blocks)
        if header.generation == 0:
            assert header.base_build_id == header.build_id
            assert files_in(current) == {HEADER_NAME, diff_name(header.build_id)}
            assert (current / diff_name(header.build_id)).read_bytes() == image(*(b for b in blocks if b))
        assert len(files_in(current)) - 1 <= config.max_generations
        previous = current
    assert generations == [1, 2, 0, 1, 2, 0]


def stored_bytes(directory: Path) -> int:
    """What a snapshot directory holds on disk besides its header: its diff files."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.name != HEADER_NAME)


@pytest.mark.parametrize("kind", [RawKind.FULL, RawKind.SPARSE_DIFF])
def test_a_guest_keeping_one_block_per_generation_live_cannot_multiply_the_snapshot(
    tmp_path: Path, kind: RawKind
) -> None:
    # The attack: dirty all of memory, then at each pause rewrite everything but the blocks kept from
    # earlier generations. Every diff stays referenced by one block, so without a size cap generation g
    # holds about g + 1 times the memory until max_generations collapses it.
    n, config = 64, MemoryConfig()
    limit = 2 * n * K  # the default max_stored_ratio
    memory = [1000 + i for i in range(n)]
    (tmp_path / "raw").write_bytes(image(*memory))
    previous = new_dir(tmp_path, "s0")
    process_full(tmp_path / "raw", previous)
    generations = []
    for step in range(1, 3 * config.max_generations):
        kept = step % n  # blocks [0, kept) keep the generation that last wrote them
        for i in range(kept, n):
            memory[i] = 1000 * (step + 1) + i
        raw = tmp_path / f"raw{step}"
        if kind is RawKind.FULL:
            raw.write_bytes(image(*memory))
        else:
            write_sparse(raw, n * K, {i: block(memory[i]) for i in range(kept, n)})
        current = new_dir(tmp_path, f"s{step}")
        with Chain.open(previous) as parent:
            header = process_diff(raw, parent, current, kind=kind, config=config)
        generations.append(header.generation)
        assert stored_bytes(current) <= limit, f"pause {step}: {stored_bytes(current) / (n * K):.2f} x memory"
        with Chain.open(current) as chain:
            chain.materialize(tmp_path / f"ram{step}")
        assert (tmp_path / f"ram{step}").read_bytes() == image(*memory)
        assert files_in(current) == {HEADER_NAME, *(diff_name(b) for b in header.builds)}
        previous = current
    assert generations[:4] == [1, 0, 1, 0]  # collapsed as soon as the cap is exceeded, not before


def test_size_cap_leaves_ordinary_chains_alone(tmp_path: Path) -> None:
    # Small diffs on a full memory stay chained up to the generation cap.
    config = MemoryConfig(max_generations=4, max_stored_ratio=1.5)
    memory = list(range(1, 33))
    (tmp_path / "raw").write_bytes(image(*memory))
    previous = new_dir(tmp_path, "s0")
    process_full(tmp_path / "raw", previous)
    generations = []
    for step in range(1, 5):
        memory[step] = 100 + step
        (tmp_path / "raw").write_bytes(image(*memory))
        current = new_dir(tmp_path, f"s{step}")
        with Chain.open(previous) as parent:
            generations.append(process_diff(tmp_path / "raw", parent, current, config=config).generation)
        previous = current
    assert generations == [1, 2, 3, 0]


def test_collapse_any_chain(tmp_path: Path) -> None:
    (tmp_path / "raw0").write_bytes(image(1, 2, 3, 0))
    s0, s1, flat = new_dir(tmp_path, "s0"), new_dir(tmp_path, "s1"), new_dir(tmp_path, "flat")
    process_full(tmp_path / "raw0", s0)
    (tmp_path / "raw1").write_bytes(image(1, 0, 9, 8))
    with Chain.open(s0) as parent:
        process_diff(tmp_path / "raw1", parent, s1)
    with Chain.open(s1) as chain:
        header = collapse(chain, flat)
    assert header.generation == 0
    assert files_in(flat) == {HEADER_NAME, diff_name(header.build_id)}
    assert (flat / diff_name(header.build_id)).read_bytes() == image(1, 9, 8)


def test_bad_input_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "raw0").write_bytes(image(1, 2))
    s0, s1 = new_dir(tmp_path, "s0"), new_dir(tmp_path, "s1")
    process_full(tmp_path / "raw0", s0)
    (tmp_path / "short").write_bytes(image(1))
    (tmp_path / "ragged").write_bytes(image(1, 2) + b"x")
    (tmp_path / "empty").write_bytes(b"")
    with Chain.open(s0) as parent:
        with pytest.raises(InvalidArgument, match="parent snapshot"):
            process_diff(tmp_path / "short", parent, s1)
        with pytest.raises(InvalidArgument, match="whole number"):
            process_diff(tmp_path / "ragged", parent, s1)
        with pytest.raises(NotFound):
            process_diff(tmp_path / "missing", parent, s1)
        with pytest.raises(InvalidArgument, match="not into its directory"):
            process_diff(tmp_path / "raw0", parent, s0)
    with pytest.raises(InvalidArgument, match="whole number"):
        process_full(tmp_path / "empty", s1)
    with pytest.raises(InvalidArgument):
        MemoryConfig(max_generations=0)
    for ratio in (0.99, 0.0, -1.0, float("nan")):
        with pytest.raises(InvalidArgument, match="max_stored_ratio"):
            MemoryConfig(max_stored_ratio=ratio)
    assert files_in(s1) == set()
    with Chain.open(s0) as chain:
        assert chain.read(0, 2 * K) == image(1, 2)


# -- round trip: random images, random diff sequences -----------------------------------------------
steps = st.lists(
    st.tuples(
        st.sampled_from([RawKind.FULL, RawKind.SPARSE_DIFF]),
        st.dictionaries(st.integers(0, 47), st.integers(0, 6), max_size=20),  # block -> new tag (0 = zero)
    ),
    min_size=1,
    max_size=7,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=st.lists(st.integers(0, 6), min_size=1, max_size=48),
    sequence=steps,
    cap=st.integers(1, 4),
)
def test_round_trip(first: list[int], sequence: list[tuple[RawKind, dict[int, int]]], cap: int) -> None:
    config = MemoryConfig(max_generations=cap)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        memory = [t * 1000 + i if t else 0 for i, t in enumerate(first)]  # tags unique per block
        (root / "raw").write_bytes(image(*memory))
        previous = new_dir(root, "s0")
        process_full(root / "raw", previous)
        for step, (kind, changes) in enumerate(sequence, 1):
            changes = {i: t for i, t in changes.items() if i < len(memory)}
            for i, t in changes.items():
                memory[i] = t * 1000 + i + step * 7 if t else 0
            raw = root / f"raw{step}"
            if kind is RawKind.FULL:
                raw.write_bytes(image(*memory))
            else:
                write_sparse(raw, len(memory) * K, {i: block(memory[i]) for i in changes})
            current = new_dir(root, f"s{step}")
            with Chain.open(previous) as parent:
                header = process_diff(raw, parent, current, kind=kind, config=config)
            assert header.generation < cap
            with Chain.open(current) as chain:
                chain.materialize(root / f"ram{step}")
            assert (root / f"ram{step}").read_bytes() == image(*memory)
            assert files_in(current) == {HEADER_NAME, *(diff_name(b) for b in header.builds)}
            previous = current


# -- blocks that differ from zero (or from their parent) in a single byte, anywhere -------------------
def sparse_block(position: int | None, value: int = 1) -> bytes:
    """A zero block, or one with a single non-zero byte at ``position`` (the scans sample a few bytes)."""
    data = bytearray(K)
    if position is not None:
        data[position] = value
    return bytes(data)


positions = st.one_of(st.none(), st.integers(0, K - 1), st.sampled_from([0, 1, 1031, 2063, 3079, K - 1]))


@settings(max_examples=150, deadline=None)
@given(st.lists(positions, min_size=1, max_size=40), st.data())
def test_single_byte_blocks_are_data_and_single_byte_changes_are_found(
    layout: list[int | None], data: st.DataObject
) -> None:
    memory = b"".join(sparse_block(p) for p in layout)
    expected_diff = b"".join(sparse_block(p) for p in layout if p is not None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "raw").write_bytes(memory)
        s0, s1 = new_dir(root, "s0"), new_dir(root, "s1")
        header = process_full(root / "raw", s0)
        stored = s0 / diff_name(header.build_id)
        assert (stored.read_bytes() if stored.exists() else b"") == expected_diff
        # change one byte of some blocks (to another value, or back to zero)
        changed = bytearray(memory)
        touched = data.draw(st.sets(st.integers(0, len(layout) - 1), max_size=len(layout)))
        for index in touched:
            offset = index * K + data.draw(st.integers(0, K - 1))
            changed[offset] = 0 if changed[offset] else data.draw(st.integers(1, 255))
        (root / "raw1").write_bytes(bytes(changed))
        with Chain.open(s0) as parent:
            h1 = process_diff(root / "raw1", parent, s1)
        with Chain.open(s1) as chain:
            assert chain.read(0, len(changed)) == bytes(changed)
        really_changed = {
            i for i in range(len(layout)) if changed[i * K : (i + 1) * K] != memory[i * K : (i + 1) * K]
        }
        new_blocks = {
            m.offset // K + i for m in h1.mappings if m.build_id == h1.build_id for i in range(m.length // K)
        }
        new_zero = {i for i in really_changed if not any(changed[i * K : (i + 1) * K])}
        assert new_blocks == really_changed - new_zero


def test_long_zero_and_data_runs_at_every_alignment(tmp_path: Path) -> None:
    # zero runs longer than the 64 KiB chunk, starting at every block offset inside a chunk
    for shift in range(17):
        layout = [1] * shift + [0] * 40 + [2] * 3 + [0] * 16 + [3]
        memory = image(*layout)
        raw = tmp_path / f"raw{shift}"
        raw.write_bytes(memory)
        dest = new_dir(tmp_path, f"s{shift}")
        header = process_full(raw, dest)
        assert (dest / diff_name(header.build_id)).read_bytes() == image(*(t for t in layout if t))
        with Chain.open(dest) as chain:
            assert chain.read(0, len(memory)) == memory


def test_diff_on_top_of_a_seed_snapshot(tmp_path: Path) -> None:
    # A seed directory: v1 header (no checksums) and the generation-0 diff under the legacy name.
    b = UUID("6f1c2a4e-8d3b-4c5a-9e7f-0a1b2c3d4e5f")
    seed = new_dir(tmp_path, "seed")
    v1 = Header(
        4 * K,
        3,
        b,
        b,
        (Mapping(0, K, b, 0), Mapping(K, K, ZERO_BUILD, 0), Mapping(2 * K, 2 * K, b, K)),
        version=1,
    )
    (seed / HEADER_NAME).write_bytes(v1.encode())
    (seed / "memfile").write_bytes(image(1, 2, 3))
    (tmp_path / "raw").write_bytes(image(1, 5, 2, 0))
    dest = new_dir(tmp_path, "next")
    with Chain.open(seed) as parent:
        header = process_diff(tmp_path / "raw", parent, dest)
    assert (header.version, header.generation, header.base_build_id) == (2, 4, b)
    assert files_in(dest) == {HEADER_NAME, diff_name(b), diff_name(header.build_id)}
    assert header.file(b).checksum == checksum(image(1, 2, 3))  # computed, the seed had none
    with Chain.open(dest) as chain:
        assert chain.read(0, 4 * K) == image(1, 5, 2, 0)
