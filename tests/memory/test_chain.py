"""Opening snapshot directories: discovery, damage detection, reads, materialize."""

from __future__ import annotations

import os
from pathlib import Path
from uuid import UUID

import pytest

from wrenbox.errors import AlreadyExists, CorruptData, InvalidArgument, NotFound
from wrenbox.memory.chain import Chain
from wrenbox.memory.format import HEADER_NAME, ZERO_BUILD, Header, Mapping, checksum, diff_name
from wrenbox.memory.process import process_full
from wrenbox.memory.writer import reclaim

K = 4096
B = UUID("6f1c2a4e-8d3b-4c5a-9e7f-0a1b2c3d4e5f")


def block(tag: int) -> bytes:
    return bytes([tag]) * K


def image(*tags: int) -> bytes:
    return b"".join(block(t) for t in tags)


@pytest.fixture
def snapshot(tmp_path: Path) -> tuple[Path, bytes]:
    memory = image(1, 0, 2, 3, 0, 0, 4, 0)
    (tmp_path / "raw").write_bytes(memory)
    (tmp_path / "snap").mkdir()
    process_full(tmp_path / "raw", tmp_path / "snap")
    return tmp_path / "snap", memory


def fd_count() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


def the_diff(directory: Path) -> Path:
    (path,) = [p for p in directory.iterdir() if p.name != HEADER_NAME]
    return path


def test_reads_lookup_and_mappings(snapshot: tuple[Path, bytes]) -> None:
    directory, memory = snapshot
    with Chain.open(directory) as chain:
        assert chain.size == len(memory)
        assert chain.read(0, len(memory)) == memory
        assert chain.read(K + 10, 3 * K) == memory[K + 10 : 4 * K + 10]
        loc = chain.lookup(3 * K + 5)
        assert chain.view(loc.build_id)[loc.storage_offset] == 3
        assert loc.length == K - 5
        clipped = list(chain.mappings(K // 2 * 3, 7 * K))
        assert clipped[0].offset == K // 2 * 3
        assert sum(m.length for m in clipped) == 7 * K - K // 2 * 3
        assert chain.lookup(K).is_zero
        with pytest.raises(InvalidArgument):
            list(chain.mappings(0, len(memory) + K))
        with pytest.raises(InvalidArgument, match="not part"):
            chain.view(UUID(int=5))
        fd = chain.fileno(loc.build_id)
        assert os.pread(fd, 1, loc.storage_offset) == b"\x03"
    with pytest.raises(OSError, match="Bad file descriptor"):  # closed with the chain
        os.fstat(fd)


def test_missing_header_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        Chain.open(tmp_path)


def test_missing_diff_is_refused(snapshot: tuple[Path, bytes]) -> None:
    directory, _ = snapshot
    the_diff(directory).unlink()
    with pytest.raises(CorruptData, match="diff file not found"):
        Chain.open(directory)


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_diff_is_refused_even_without_verify(snapshot: tuple[Path, bytes], verify: bool) -> None:
    directory, _ = snapshot
    diff = the_diff(directory)
    os.truncate(diff, diff.stat().st_size - K)
    with pytest.raises(CorruptData, match="truncated"):
        Chain.open(directory, verify=verify)


def test_damaged_diff_is_refused(snapshot: tuple[Path, bytes]) -> None:
    directory, _ = snapshot
    diff = the_diff(directory)
    with open(diff, "r+b") as f:
        f.seek(K + 17)
        f.write(b"\xff")
    with pytest.raises(CorruptData, match="checksum"):
        Chain.open(directory)
    # verify=False trusts the content (length still checked): the caller chose not to pay for the hash
    with Chain.open(directory, verify=False) as chain, pytest.raises(CorruptData):
        chain.verify()


def test_damaged_header_is_refused(snapshot: tuple[Path, bytes]) -> None:
    directory, _ = snapshot
    header = directory / HEADER_NAME
    data = bytearray(header.read_bytes())
    data[100] ^= 1
    header.write_bytes(bytes(data))
    with pytest.raises(CorruptData, match="checksum"):
        Chain.open(directory)


def test_no_fd_leak_when_refused(snapshot: tuple[Path, bytes]) -> None:
    directory, _ = snapshot
    diff = the_diff(directory)
    os.truncate(diff, diff.stat().st_size - K)
    before = fd_count()
    for _ in range(5):
        with pytest.raises(CorruptData):
            Chain.open(directory)
    assert fd_count() == before


def test_seed_directory_with_legacy_memfile(tmp_path: Path) -> None:
    # A seed generation-0 snapshot: v1 header and the packed diff under the legacy name "memfile".
    memory = image(7, 0, 8, 9)
    header = Header(
        len(memory),
        0,
        B,
        B,
        (Mapping(0, K, B, 0), Mapping(K, K, ZERO_BUILD, 0), Mapping(2 * K, 2 * K, B, K)),
        version=1,
    )
    (tmp_path / HEADER_NAME).write_bytes(header.encode())
    (tmp_path / "memfile").write_bytes(image(7, 8, 9))
    with Chain.open(tmp_path) as chain:
        assert chain.path(B).name == "memfile"
        assert chain.read(0, len(memory)) == memory
        info = chain.file_info(B)
        assert info.length == 3 * K
        assert info.checksum == checksum(image(7, 8, 9))
    # the named file wins over the legacy one
    (tmp_path / diff_name(B)).write_bytes(image(7, 8, 9))
    with Chain.open(tmp_path) as chain:
        assert chain.path(B).name == diff_name(B)
    (tmp_path / diff_name(B)).write_bytes(image(7, 8))  # too short for the mappings
    with pytest.raises(CorruptData, match="too short"):
        Chain.open(tmp_path)


def test_materialize_is_exact_sparse_and_refuses_to_overwrite(tmp_path: Path) -> None:
    size = 64 * 1024 * 1024
    raw = tmp_path / "raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for at in (0, 5 * 1024 * 1024, size - 2 * K):
            f.seek(at)
            f.write(os.urandom(2 * K))
    (tmp_path / "snap").mkdir()
    process_full(raw, tmp_path / "snap")
    with Chain.open(tmp_path / "snap") as chain:
        chain.materialize(tmp_path / "ram")
        with pytest.raises(AlreadyExists):
            chain.materialize(tmp_path / "ram")
    ram = tmp_path / "ram"
    assert ram.read_bytes() == raw.read_bytes()
    assert ram.stat().st_blocks * 512 <= 1024 * 1024  # 24 KiB of data: the rest stayed holes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ram", "raw", "snap"]  # no temp file left


def test_crash_while_materializing_leaves_only_a_reclaimable_temporary(
    snapshot: tuple[Path, bytes], tmp_path: Path
) -> None:
    directory, memory = snapshot
    ram = tmp_path / "ram"
    pid = os.fork()
    if pid == 0:  # the child dies right after its first write into the RAM file
        try:
            real = os.pwrite

            def write_then_die(*args: object) -> int:
                real(*args)
                os._exit(7)

            os.pwrite = write_then_die
            with Chain.open(directory) as chain:
                chain.materialize(ram)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7
    assert not ram.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".ram.tmp-")]
    assert len(leftovers) == 1
    assert reclaim(ram) == leftovers
    assert not leftovers[0].exists()
    with Chain.open(directory) as chain:
        chain.materialize(ram)
    assert ram.read_bytes() == memory
