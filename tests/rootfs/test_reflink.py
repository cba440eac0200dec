"""What only reflink does: clones share extents, and anywhere without reflink it refuses (never copies)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wrenbox.errors import Unsupported
from wrenbox.rootfs import RootfsConfig, backend_for
from wrenbox.rootfs.reflink import filesystem_type, supports_reflink

from .helpers import MiB, make_base

pytestmark = [pytest.mark.anyio, pytest.mark.root]


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


@pytest.mark.parametrize("fs", ["xfs", "btrfs"])
async def test_clones_share_the_base_extents(on_fs, fs: str) -> None:
    root = on_fs(fs)
    base = root / "base.ext4"
    make_base(base, size=64 * MiB)  # 32 MiB of data
    os.sync()
    backend = backend_for("reflink", RootfsConfig(disks_dir=root / "disks"))
    await backend.create(base, "warmup")  # creates the directory
    os.sync()
    free = _free(root)
    for i in range(8):
        await backend.create(base, f"clone{i}")
    os.sync()
    # Eight full copies would take 256 MiB; clones only take metadata.
    assert free - _free(root) < 4 * MiB
    assert filesystem_type(root) == fs
    assert supports_reflink(root)


async def test_ext4_is_refused_with_a_clear_error(on_fs) -> None:
    root = on_fs("ext4")
    base = root / "base.ext4"
    make_base(base)
    backend = backend_for("reflink", RootfsConfig(disks_dir=root / "disks"))
    with pytest.raises(Unsupported, match=r"ext4 filesystem .* cannot make reflink clones.*xfs.*btrfs"):
        await backend.create(base, "nope")
    assert list((root / "disks").iterdir()) == []  # no silent copy, no empty leftover
    assert not supports_reflink(root)


async def test_base_on_another_filesystem_is_refused(on_fs) -> None:
    images, disks = on_fs("xfs"), on_fs("btrfs")
    base = images / "base.ext4"
    make_base(base)
    backend = backend_for("reflink", RootfsConfig(disks_dir=disks / "disks"))
    with pytest.raises(Unsupported, match="different ones"):
        await backend.create(base, "nope")
    assert list((disks / "disks").iterdir()) == []


async def test_flatten_across_filesystems_falls_back_to_a_sparse_copy(on_fs) -> None:
    root, elsewhere = on_fs("xfs"), on_fs("ext4")
    base = root / "base.ext4"
    content = make_base(base)
    backend = backend_for("reflink", RootfsConfig(disks_dir=root / "disks"))
    disk = await backend.create(base, "d")
    image = await backend.flatten(disk, elsewhere / "template.ext4")
    assert image.path.read_bytes() == content
    assert image.path.stat().st_blocks * 512 <= len(content) // 2 + MiB  # the holes survived
