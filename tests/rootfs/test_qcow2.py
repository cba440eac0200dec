"""What only qcow2 does: the overlay names its backing file, and restore/flatten check it."""

from __future__ import annotations

from pathlib import Path

import pytest

from wrenbox.errors import CorruptData
from wrenbox.rootfs import RootfsConfig, backend_for

from .helpers import MiB, allocated, host, make_base, overwrite, temporaries

pytestmark = pytest.mark.anyio


@pytest.fixture
def backend(tmp_path: Path):
    return backend_for("qcow2", RootfsConfig(disks_dir=tmp_path / "disks"))


async def test_overlay_is_small_and_backed_by_the_base(backend, tmp_path: Path) -> None:
    base = tmp_path / "base.ext4"
    make_base(base, size=32 * MiB)
    disk = await backend.create(base, "ov", size=64 * MiB)
    assert allocated(disk.store) < MiB
    info = host(["qemu-img", "info", "--output=json", str(disk.store)])
    assert f'"backing-filename": "{base}"' in info
    assert '"backing-filename-format": "raw"' in info


async def test_restore_refuses_an_overlay_that_is_not_the_recorded_one(backend, tmp_path: Path) -> None:
    base, other = tmp_path / "base.ext4", tmp_path / "other.ext4"
    make_base(base)
    make_base(other, seed=2)
    disk = await backend.create(base, "swap")
    await backend.persist(disk)
    # Same file name, but it now reads through another image.
    disk.store.unlink()
    overlay = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(other), "-F", "raw"]
    host([*overlay, str(disk.store), str(disk.size)])
    with pytest.raises(CorruptData, match="not the overlay the record describes"):
        await backend.restore(disk)

    disk.store.write_bytes(b"garbage")
    with pytest.raises(CorruptData):
        await backend.restore(disk)


async def test_flatten_refuses_when_the_base_changed(backend, tmp_path: Path) -> None:
    base = tmp_path / "base.ext4"
    make_base(base)
    disk = await backend.create(base, "f")
    overwrite(base, 0, b"\xff" * 16)
    with pytest.raises(CorruptData):
        await backend.flatten(disk, tmp_path / "template.ext4")
    assert not (tmp_path / "template.ext4").exists()
    assert not temporaries(tmp_path)
