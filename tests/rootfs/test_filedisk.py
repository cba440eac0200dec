"""qcow2, reflink and copy disks, for real: qcow2/copy in a temp dir, reflink on real xfs and btrfs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from wrenbox.errors import AlreadyExists, CorruptData, InvalidArgument, NotFound
from wrenbox.rootfs import BaseImage, Disk, DiskFormat, RootfsBackend, RootfsConfig, backend_for

from .helpers import (
    MiB,
    allocated,
    assert_content,
    expected_digest,
    make_base,
    overwrite,
    sha256,
    temporaries,
    write_pattern,
)

pytestmark = pytest.mark.anyio

CASES = [
    pytest.param(("qcow2", None), id="qcow2"),
    pytest.param(("copy", None), id="copy"),
    pytest.param(("reflink", "xfs"), id="reflink-xfs", marks=pytest.mark.root),
    pytest.param(("reflink", "btrfs"), id="reflink-btrfs", marks=pytest.mark.root),
]


@dataclass
class Setup:
    backend: RootfsBackend
    base: Path
    content: bytes
    scratch: Path

    def fresh_backend(self) -> RootfsBackend:
        """A new backend instance with nothing cached: what a restarted wrenbox would have."""
        return backend_for(self.backend.name, self.backend.config)


@pytest.fixture(params=CASES)
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Setup:
    name, fs = request.param
    root = tmp_path if fs is None else request.getfixturevalue("on_fs")(fs)
    images = root / "images"
    images.mkdir()
    base = images / "base.ext4"
    content = make_base(base)
    backend = backend_for(name, RootfsConfig(disks_dir=root / "disks", image_roots=(images,)))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return Setup(backend, base, content, scratch)


async def test_create_shows_the_base_and_leaves_it_untouched(setup: Setup) -> None:
    before = (sha256(setup.base), setup.base.stat().st_mtime_ns)
    disk = await setup.backend.create(setup.base, "sbx1")

    assert disk.backend == setup.backend.name
    assert disk.size == len(setup.content)
    assert disk.base.path == setup.base
    assert disk.base.digest == expected_digest(setup.content)
    assert disk.path.is_file()
    assert disk.format is (DiskFormat.QCOW2 if setup.backend.name == "qcow2" else DiskFormat.RAW)
    assert_content(disk, setup.content, setup.scratch)

    expected = bytearray(setup.content)
    write_pattern(disk, 0, 64 * 1024, 0xAB, expected)
    write_pattern(disk, 3 * MiB + 4096, MiB, 0x5C, expected)  # straddles data and a hole of the base
    assert_content(disk, bytes(expected), setup.scratch)
    assert (sha256(setup.base), setup.base.stat().st_mtime_ns) == before


async def test_disks_on_one_base_are_independent(setup: Setup) -> None:
    one = await setup.backend.create(setup.base, "one")
    two = await setup.backend.create(setup.base, "two")
    expected_one = bytearray(setup.content)
    write_pattern(one, 2 * MiB, 4096, 0x11, expected_one)
    assert_content(one, bytes(expected_one), setup.scratch)
    assert_content(two, setup.content, setup.scratch)


async def test_disk_larger_than_its_base(setup: Setup) -> None:
    size = len(setup.content) + 24 * MiB
    disk = await setup.backend.create(setup.base, "big", size=size)
    assert disk.size == size
    expected = bytearray(setup.content) + bytearray(24 * MiB)
    assert_content(disk, bytes(expected), setup.scratch)  # the growth reads as zeros
    write_pattern(disk, size - 8192, 8192, 0xEE, expected)  # the very end is writable
    assert_content(disk, bytes(expected), setup.scratch)


async def test_flatten_is_the_merged_view_standalone_and_sparse(setup: Setup, tmp_path: Path) -> None:
    size = len(setup.content) + 8 * MiB
    disk = await setup.backend.create(setup.base, "flat", size=size)
    expected = bytearray(setup.content) + bytearray(8 * MiB)
    write_pattern(disk, MiB, 2 * MiB, 0x42, expected)
    write_pattern(disk, size - 4096, 4096, 0x99, expected)
    await setup.backend.persist(disk)

    dest = disk.store.parent.parent / "template.ext4"  # same filesystem as the disks
    image = await setup.backend.flatten(disk, dest)

    assert isinstance(image, BaseImage)
    assert image.path == dest
    assert image.size == size
    assert dest.read_bytes() == bytes(expected)
    assert image.digest == expected_digest(bytes(expected))
    # Holes stay holes: the base has 4 MiB of data, we wrote ~2 MiB more; the image is 16 MiB.
    assert allocated(dest) <= 8 * MiB
    # The template no longer depends on the disk or the base.
    await setup.backend.remove(disk)
    assert dest.read_bytes() == bytes(expected)
    assert not temporaries(dest.parent)

    # and it serves as a base for new disks
    child = await setup.backend.create(image, "child")
    assert_content(child, bytes(expected), setup.scratch)


async def test_flatten_never_overwrites(setup: Setup) -> None:
    disk = await setup.backend.create(setup.base, "d1")
    dest = setup.scratch / "exists.ext4"
    dest.write_bytes(b"keep me")
    with pytest.raises(AlreadyExists):
        await setup.backend.flatten(disk, dest)
    assert dest.read_bytes() == b"keep me"
    with pytest.raises(NotFound):
        await setup.backend.flatten(disk, setup.scratch / "no-such-dir" / "x.ext4")


async def test_persist_restore_round_trip_across_a_restart(setup: Setup) -> None:
    disk = await setup.backend.create(setup.base, "roundtrip", size=len(setup.content) + MiB)
    expected = bytearray(setup.content) + bytearray(MiB)
    write_pattern(disk, 5 * MiB, 8192, 0x77, expected)
    saved = (await setup.backend.persist(disk)).model_dump_json()

    restarted = setup.fresh_backend()
    restored = await restarted.restore(Disk.from_json(saved))
    assert restored == disk
    assert_content(restored, bytes(expected), setup.scratch)
    write_pattern(restored, 0, 4096, 0x01, expected)  # writable again
    assert_content(restored, bytes(expected), setup.scratch)


async def test_restore_refuses_a_modified_base(setup: Setup) -> None:
    disk = await setup.backend.create(setup.base, "victim")
    await setup.backend.persist(disk)
    overwrite(setup.base, 100, b"tampered")
    with pytest.raises(CorruptData, match="changed since the disk was created"):
        await setup.fresh_backend().restore(disk)


async def test_restore_accepts_a_touched_but_identical_base(setup: Setup) -> None:
    disk = await setup.backend.create(setup.base, "touched")
    st = setup.base.stat()
    os.utime(setup.base, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    restored = await setup.fresh_backend().restore(disk)  # fast path misses, full hash matches
    assert restored.base.digest == disk.base.digest
    assert restored.base.mtime_ns == st.st_mtime_ns + 10**9
    assert (await setup.backend.restore(restored)) == restored  # and now the fast path holds


async def test_restore_of_a_missing_disk(setup: Setup) -> None:
    disk = await setup.backend.create(setup.base, "gone")
    disk.store.unlink()
    with pytest.raises(NotFound):
        await setup.backend.restore(disk)
    with pytest.raises(NotFound):
        await setup.backend.persist(disk)


async def test_remove_is_idempotent(setup: Setup) -> None:
    disk = await setup.backend.create(setup.base, "bye")
    await setup.backend.remove(disk)
    assert not disk.store.exists()
    await setup.backend.remove(disk)
    assert setup.base.is_file()


async def test_reclaim_deletes_only_disks_not_in_use(setup: Setup) -> None:
    keep = await setup.backend.create(setup.base, "keep")
    lost = await setup.backend.create(setup.base, "lost")
    other = setup.backend.config.disks_dir / "notes.txt"  # not a disk file of this backend
    other.write_text("x")

    reclaimed = await setup.backend.reclaim([keep])

    assert reclaimed == [f"disk file {lost.store}"]
    assert keep.store.exists()
    assert other.exists()
    assert not lost.store.exists()
    assert await setup.backend.reclaim([keep]) == []


async def test_bad_input_changes_nothing(setup: Setup) -> None:
    backend, base = setup.backend, setup.base
    for bad_id in ("../escape", "", "a/b", "x" * 65, "-lead", "with@at"):
        with pytest.raises(InvalidArgument):
            await backend.create(base, bad_id)
    with pytest.raises(InvalidArgument, match="smaller than its base"):
        await backend.create(base, "small", size=len(setup.content) - 512)
    with pytest.raises(InvalidArgument, match="multiple of 512"):
        await backend.create(base, "odd", size=len(setup.content) + 100)
    with pytest.raises(InvalidArgument):
        await backend.create(base, "str", size="1G")  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        await backend.create(base.parent / "missing.ext4", "nobase")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        await backend.create(base.parent, "dirbase")
    assert not backend.config.disks_dir.exists() or not list(backend.config.disks_dir.iterdir())

    disk = await backend.create(base, "twice")
    with pytest.raises(AlreadyExists):
        await backend.create(base, "twice")
    assert_content(disk, setup.content, setup.scratch)


async def test_records_are_only_trusted_to_name_their_own_files(setup: Setup, tmp_path: Path) -> None:
    disk = await setup.backend.create(setup.base, "mine")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    forged = disk.model_copy(update={"store": victim, "path": victim})
    with pytest.raises(InvalidArgument):
        await setup.backend.remove(forged)
    assert victim.read_text() == "precious"
    foreign = disk.model_copy(update={"backend": "dmsnapshot"})
    with pytest.raises(InvalidArgument, match="belongs to the 'dmsnapshot' backend"):
        await setup.backend.persist(foreign)


def test_corrupt_record_is_refused() -> None:
    with pytest.raises(CorruptData):
        Disk.from_json('{"backend": "qcow2"}')
    with pytest.raises(CorruptData):
        Disk.from_json("not json")


async def test_revert_goes_back_to_the_checkpoint(setup: Setup) -> None:
    disk = await setup.backend.create(setup.base, "ckpt1")
    expected = bytearray(setup.content)
    write_pattern(disk, MiB, 4096, 0x11, expected)
    at_checkpoint = bytes(expected)
    await setup.backend.checkpoint(disk)
    write_pattern(disk, 0, 8192, 0x22, expected)  # what a resumed VM writes before the resume fails
    write_pattern(disk, 3 * MiB, 4096, 0x33, expected)
    await setup.fresh_backend().revert(disk)  # after a restart, too
    assert_content(disk, at_checkpoint, setup.scratch)
    await setup.backend.revert(disk)  # the checkpoint is gone: nothing happens
    assert_content(disk, at_checkpoint, setup.scratch)
    await setup.backend.remove(disk)
    assert list(setup.backend.config.disks_dir.iterdir()) == []


async def test_dropping_the_checkpoint_keeps_the_writes(setup: Setup) -> None:
    disk = await setup.backend.create(setup.base, "ckpt2")
    expected = bytearray(setup.content)
    await setup.backend.checkpoint(disk)
    await setup.backend.checkpoint(disk)  # a second checkpoint replaces the first
    write_pattern(disk, 0, 4096, 0x44, expected)
    await setup.backend.drop_checkpoint(disk)
    await setup.backend.drop_checkpoint(disk)
    await setup.backend.revert(disk)  # nothing to revert to
    assert_content(disk, bytes(expected), setup.scratch)
    assert await setup.backend.reclaim([disk]) == []
    await setup.backend.remove(disk)


async def test_reclaim_removes_checkpoints_of_unknown_disks(setup: Setup) -> None:
    disk = await setup.backend.create(setup.base, "ckpt3")
    await setup.backend.checkpoint(disk)
    kept = await setup.backend.create(setup.base, "ckpt4")
    await setup.backend.checkpoint(kept)
    await setup.backend.reclaim([kept])
    await setup.backend.revert(kept)  # its checkpoint survived the reclaim
    left = sorted(p.name for p in setup.backend.config.disks_dir.iterdir())
    assert all(name.startswith("ckpt4") for name in left)
    await setup.backend.remove(kept)
    assert list(setup.backend.config.disks_dir.iterdir()) == []
