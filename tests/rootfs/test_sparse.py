"""Sparse images: copies keep content and holes; the content digest depends on content only."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from wrenbox.rootfs.sparse import content_digest, sparse_copy

from .helpers import MiB, allocated, expected_digest, make_base, overwrite


def test_copy_keeps_content_and_holes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    content = make_base(src, size=16 * MiB)
    written = sparse_copy(src, dst)
    assert dst.read_bytes() == content
    assert written == 8 * MiB
    assert allocated(dst) <= 8 * MiB + 64 * 1024


def test_written_zeros_become_holes_and_the_file_grows(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    rng = random.Random(7)
    data = bytearray(5 * MiB + 12345)  # zeros, written out (allocated), with a few islands of data
    for offset in (0, 64 * 1024 - 1, 2 * MiB + 100, 5 * MiB + 12000):
        data[offset : offset + 300] = rng.randbytes(300)
    src.write_bytes(data)
    assert allocated(src) >= len(data)

    sparse_copy(src, dst, size=8 * MiB)

    assert dst.stat().st_size == 8 * MiB
    assert dst.read_bytes() == bytes(data) + bytes(8 * MiB - len(data))
    # Only the 64 KiB blocks holding data are allocated (0 and 64K-1 span two blocks).
    assert allocated(dst) <= 6 * 64 * 1024


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_base(src, size=MiB)
    dst.write_bytes(b"x")
    with pytest.raises(FileExistsError):
        sparse_copy(src, dst)
    assert dst.read_bytes() == b"x"


@pytest.mark.root
def test_block_device_source(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    content = make_base(src, size=8 * MiB)
    loop = subprocess.run(
        ["losetup", "--read-only", "--find", "--show", str(src)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        sparse_copy(Path(loop), dst)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)
    assert dst.read_bytes() == content
    assert allocated(dst) <= 4 * MiB + 64 * 1024


def test_digest_is_the_documented_one(tmp_path: Path) -> None:
    image = tmp_path / "image"
    content = make_base(image, size=6 * MiB + 4096)  # a partial last block too
    assert content_digest(image) == expected_digest(content)


def test_digest_ignores_allocation_but_sees_every_byte(tmp_path: Path) -> None:
    sparse, dense = tmp_path / "sparse", tmp_path / "dense"
    content = make_base(sparse, size=4 * MiB)
    dense.write_bytes(content)  # same bytes, zeros written out
    assert allocated(dense) > allocated(sparse)
    digest = content_digest(sparse)
    assert content_digest(dense) == digest

    for offset in (0, MiB + 12345, 4 * MiB - 1):  # in data, in a hole, the last byte
        changed = tmp_path / f"changed-{offset}"
        changed.write_bytes(content)
        overwrite(changed, offset, bytes([content[offset] ^ 1]))
        assert content_digest(changed) != digest
    longer = tmp_path / "longer"
    longer.write_bytes(content + bytes(512))  # more zeros is different content
    assert content_digest(longer) != digest
