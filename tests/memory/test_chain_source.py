"""A snapshot chain served by the real UFFD page server to a child doing what Firecracker does."""

from __future__ import annotations

import ctypes
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from wrenbox.errors import CorruptData, InvalidArgument
from wrenbox.memory.chain import Chain
from wrenbox.memory.format import HEADER_NAME
from wrenbox.memory.process import process_diff, process_full
from wrenbox.memory.uffd import PageServer, PageServerConfig, PageSource
from wrenbox.memory.uffd import abi as uffd_abi
from wrenbox.memory.uffd.chain_source import ChainSource

K = 4096
MiB = 1 << 20
VMM = Path(__file__).with_name("uffd_vmm.py")


def make_chain(root: Path, size: int) -> tuple[Path, bytes]:
    """A two-generation snapshot (holes, zero pages, data; then 1/8 changed, some of it to zero)."""
    rng = random.Random(7)
    memory = bytearray(size)
    for unit in range(0, size, 16 * K):
        kind = rng.random()
        if kind > 0.4:
            memory[unit : unit + 16 * K] = rng.randbytes(16 * K)
    (root / "raw0").write_bytes(memory)
    (root / "s0").mkdir()
    process_full(root / "raw0", root / "s0")
    for _ in range(size // K // 8):
        at = rng.randrange(0, size // K) * K
        memory[at : at + K] = bytes(K) if rng.random() < 0.2 else rng.randbytes(K)
    (root / "raw1").write_bytes(memory)
    (root / "s1").mkdir()
    with Chain.open(root / "s0") as parent:
        process_diff(root / "raw1", parent, root / "s1")
    return root / "s1", bytes(memory)


def test_extents_cover_exactly_and_point_at_the_right_bytes(tmp_path: Path) -> None:
    directory, memory = make_chain(tmp_path, 4 * MiB)
    with ChainSource.open(directory) as source:
        assert isinstance(source, PageSource)
        assert source.size == len(memory)
        for offset, length in [(0, len(memory)), (K, 3 * K), (MiB, 256 * 1024), (len(memory) - K, K)]:
            extents = source.extents(offset, length)
            assert extents[0].offset == offset
            assert sum(e.length for e in extents) == length
            for e, following in itertools.pairwise(extents):
                assert e.offset + e.length == following.offset
            for e in extents:
                got = bytes(e.length) if e.address is None else ctypes.string_at(e.address, e.length)
                assert got == memory[e.offset : e.offset + e.length]
        for offset, length in [(1, K), (0, K + 1), (0, 0), (len(memory), K), (-K, K)]:
            with pytest.raises(InvalidArgument):
                source.extents(offset, length)


def test_damaged_chain_is_never_served(tmp_path: Path) -> None:
    directory, _ = make_chain(tmp_path, MiB)
    victim = max((p for p in directory.iterdir() if p.name != HEADER_NAME), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.seek(K)
        f.write(b"\x55")
    with pytest.raises(CorruptData):
        ChainSource.open(directory)


UNUSABLE = uffd_abi.unusable()


@pytest.mark.skipif(bool(UNUSABLE), reason=f"needs userfaultfd: {UNUSABLE}")
def test_page_server_serves_a_chain_byte_exactly(tmp_path: Path) -> None:
    size = 16 * MiB
    directory, memory = make_chain(tmp_path, size)
    (tmp_path / "expected").write_bytes(memory)  # what the child compares every page with
    fds_before = len(list(Path("/proc/self/fd").iterdir()))
    config = PageServerConfig(chunk_size=64 * 1024, prefetch=False)
    with PageServer(tmp_path / "uffd.sock", ChainSource.open(directory), config) as server:
        plan = {
            "socket": str(server.socket_path),
            "file": str(tmp_path / "expected"),
            "regions": [{"size": size, "offset": 0}],
            "steps": [{"do": "touch", "pattern": "random", "threads": 3, "seed": 5}, {"do": "verify"}],
        }
        child = subprocess.run(
            [sys.executable, str(VMM), json.dumps(plan)], capture_output=True, timeout=120, check=True
        )
        stats = server.stats
    results = [json.loads(line) for line in child.stdout.splitlines()]
    touch = next(r for r in results if r.get("step") == "touch")
    verify = next(r for r in results if r.get("step") == "verify")
    assert touch["mismatched_pages"] == 0
    assert verify["mismatched_regions"] == 0
    assert stats.fault_bytes == size
    assert stats.zeroed_bytes > 0
    assert stats.copied_bytes > 0
    assert len(list(Path("/proc/self/fd").iterdir())) == fds_before
