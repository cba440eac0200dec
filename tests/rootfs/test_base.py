"""The backend factory, the config, base-image fingerprints and atomic outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from wrenbox.config import Settings
from wrenbox.errors import AlreadyExists, CorruptData, InvalidArgument, NotFound
from wrenbox.rootfs import BACKENDS, Fingerprints, RootfsConfig, backend_for
from wrenbox.rootfs import base as base_module
from wrenbox.rootfs.base import atomic_output
from wrenbox.service import rootfs_config

from .helpers import MiB, expected_digest, make_base, overwrite, temporaries

pytestmark = pytest.mark.anyio


def test_factory_knows_every_backend(tmp_path: Path) -> None:
    config = RootfsConfig(disks_dir=tmp_path)
    assert set(BACKENDS) == {"qcow2", "reflink", "dmsnapshot", "copy"}
    for name in BACKENDS:
        assert backend_for(name, config).name == name
    with pytest.raises(InvalidArgument, match="unknown rootfs backend 'zfs'"):
        backend_for("zfs", config)


def test_config_paths_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = RootfsConfig(disks_dir=Path("disks"), image_roots=(Path("images"),))
    assert config.disks_dir == tmp_path / "disks"
    assert config.image_roots == (tmp_path / "images",)
    for bad in ({"dm_prefix": "a/b"}, {"dm_prefix": "x@"}, {"remove_attempts": 0}):
        with pytest.raises(InvalidArgument):
            RootfsConfig(disks_dir=tmp_path, **bad)
    from_settings = rootfs_config(Settings(data_dir=tmp_path / "data"))
    assert from_settings.disks_dir == tmp_path / "data" / "disks"


async def test_fingerprints_hash_each_file_version_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "base.ext4"
    content = make_base(image, size=2 * MiB)
    hashed: list[Path] = []
    real = base_module.content_digest

    def counting(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(base_module, "content_digest", counting)
    fingerprints = Fingerprints()
    first = await fingerprints.of(image)
    assert first.digest == expected_digest(content)
    assert await fingerprints.of(image) == first
    assert await fingerprints.verify(first) == first
    assert hashed == [image]

    overwrite(image, 0, bytes([content[0] ^ 0xFF]))
    with pytest.raises(CorruptData, match="changed since the disk was created"):
        await fingerprints.verify(first)
    assert len(hashed) == 2


async def test_fingerprints_refuse_what_is_not_an_image(tmp_path: Path) -> None:
    fingerprints = Fingerprints()
    with pytest.raises(NotFound):
        await fingerprints.of(tmp_path / "missing")
    odd = tmp_path / "odd"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(InvalidArgument, match="multiple of 512"):
        await fingerprints.of(odd)
    empty = tmp_path / "empty"
    empty.touch()
    with pytest.raises(InvalidArgument):
        await fingerprints.of(empty)


async def test_atomic_output_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    dest = tmp_path / "out.img"
    with pytest.raises(RuntimeError):
        async with atomic_output(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert not dest.exists()
    assert temporaries(tmp_path) == []

    async with atomic_output(dest) as tmp:
        tmp.write_bytes(b"whole")
        assert not dest.exists()
    assert dest.read_bytes() == b"whole"
    assert temporaries(tmp_path) == []

    with pytest.raises(AlreadyExists):
        async with atomic_output(dest) as tmp:
            pass
    assert dest.read_bytes() == b"whole"
