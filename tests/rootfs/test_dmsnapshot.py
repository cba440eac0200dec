"""dm-snapshot disks against the exact losetup/blockdev/dmsetup command lines (strict fake runner),
plus a real run where the kernel has device-mapper."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import pytest

from wrenbox.config import Settings
from wrenbox.errors import AlreadyExists, CommandFailed, Conflict, InUse, InvalidArgument
from wrenbox.rootfs import Disk, DmSnapshotBackend, RootfsConfig
from wrenbox.rootfs import dmsnapshot as dm
from wrenbox.rootfs.dmsnapshot import cow_size, device_mapper_available, parse_dmsetup_ls
from wrenbox.rootfs.loops import parse_losetup_json

from .helpers import FakeRunner, MiB, make_base, overwrite

pytestmark = pytest.mark.anyio

BASE_SIZE = 4 * MiB
COLS = ("losetup", "--list", "--json", "--output", "NAME,BACK-FILE,RO")
NO_DEVICE = "Device does not exist.\nCommand failed.\n"
BUSY = "device-mapper: remove ioctl on wrenbox-x  failed: Device or resource busy\nCommand failed.\n"
# Guest-written devices: libdevmapper, not udev, makes and removes the node, and the uevent turns off
# the dm and subsystem rules (finding 15; the rest is deploy/udev/12-wrenbox.rules).
CREATE = ("dmsetup", "--noudevrules", "--noudevsync", "create")
REMOVE = ("dmsetup", "--noudevrules", "--noudevsync", "remove")


def loops_json(*loops: tuple[str, str, bool]) -> str:
    return json.dumps({"loopdevices": [{"name": n, "back-file": f, "ro": ro} for n, f, ro in loops]})


class Env:
    """A base image, a backend on the strict fake runner, and the command scripts of each operation."""

    def __init__(self, tmp_path: Path, fake: FakeRunner, **config: object) -> None:
        self.images = tmp_path / "images"
        self.images.mkdir()
        self.base = self.images / "base.ext4"
        self.content = make_base(self.base, size=BASE_SIZE)
        self.config = RootfsConfig(
            disks_dir=tmp_path / "disks", image_roots=(self.images,), remove_retry_delay=0.01, **config
        )
        self.fake = fake
        self.backend = DmSnapshotBackend(self.config, runner=fake)

    def restarted(self) -> DmSnapshotBackend:
        return DmSnapshotBackend(self.config, runner=self.fake)

    def cow(self, disk_id: str) -> Path:
        return self.config.disks_dir / f"{disk_id}.cow"

    def expect_absent(self, name: str) -> None:
        self.fake.expect("dmsetup", "info", name, rc=1, err=NO_DEVICE)

    def expect_removed(self, name: str, busy: int = 0) -> None:
        self.fake.expect("dmsetup", "info", name, out=f"Name: {name}\nState: ACTIVE\n")
        for _ in range(busy):
            self.fake.expect(*REMOVE, name, rc=1, err=BUSY)
        self.fake.expect(*REMOVE, name)

    def expect_base_loop(self, existing: str | None = None, new: str = "/dev/loop3") -> str:
        """The registry's first acquire of the base: adopt a read-only loop, or attach one."""
        found = loops_json((existing, str(self.base), True)) if existing else ""
        self.fake.expect(*COLS, "--associated", str(self.base), out=found)
        if existing:
            return existing
        self.fake.expect("losetup", "--read-only", "--find", "--show", str(self.base), out=f"{new}\n")
        return new

    def expect_activate(
        self, disk_id: str, size: int, origin: str, cow_loop: str = "/dev/loop4", role: str = ""
    ) -> None:
        name = f"wrenbox-{disk_id}" + (f"@{role}" if role else "")
        self.fake.expect("blockdev", "--getsize64", origin, out=f"{BASE_SIZE}\n")
        if size > BASE_SIZE:
            table = f"0 8192 linear {origin} 0\n8192 {size // 512 - 8192} zero\n"
            self.fake.expect(*CREATE, f"{name}@origin", "--readonly", input=table.encode())
            origin = f"{dm.MAPPER}/{name}@origin"
        self.fake.expect("losetup", "--find", "--show", str(self.cow(disk_id)), out=f"{cow_loop}\n")
        table = f"0 {size // 512} snapshot {origin} {cow_loop} P 8"
        self.fake.expect(*CREATE, name, "--table", table)

    def expect_cow_loops(self, disk_id: str, *devices: str) -> None:
        found = loops_json(*((d, str(self.cow(disk_id)), False) for d in devices)) if devices else ""
        self.fake.expect(*COLS, "--associated", str(self.cow(disk_id)), out=found)
        for device in devices:
            self.fake.expect("losetup", "--detach", device)

    async def create(self, disk_id: str = "x", size: int = BASE_SIZE, base_loop: str | None = None) -> Disk:
        self.expect_absent(f"wrenbox-{disk_id}")
        origin = base_loop or self.expect_base_loop()
        self.expect_activate(disk_id, size, origin)
        return await self.backend.create(self.base, disk_id, size=size)


@pytest.fixture
def env(tmp_path: Path, fake_runner: FakeRunner) -> Env:
    return Env(tmp_path, fake_runner)


async def test_create_builds_the_seed_device_stack(env: Env) -> None:
    disk = await env.create("x")
    assert disk.path == Path("/dev/mapper/wrenbox-x")
    assert disk.store == env.cow("x")
    assert disk.size == BASE_SIZE
    st = disk.store.stat()
    assert st.st_size == cow_size(BASE_SIZE)  # room for a full rewrite
    assert st.st_blocks == 0  # sparse
    assert env.backend.loops.holders_of(env.base) == {"x"}


async def test_a_larger_disk_reads_through_a_grown_origin(env: Env) -> None:
    disk = await env.create("big", size=12 * MiB)
    assert disk.size == 12 * MiB
    assert disk.store.stat().st_size == cow_size(12 * MiB)


async def test_one_base_loop_shared_and_counted_by_holder(env: Env) -> None:
    a = await env.create("a")
    b = await env.create("b", base_loop="/dev/loop3")  # no losetup for the base the second time
    assert env.backend.loops.holders_of(env.base) == {"a", "b"}

    for disk, last in ((a, False), (b, True)):
        env.expect_removed(f"wrenbox-{disk.id}")
        for name in (f"{disk.id}@flatten", f"{disk.id}@origin", f"{disk.id}@flatten@origin"):
            env.expect_absent(f"wrenbox-{name}")
        env.expect_cow_loops(disk.id, "/dev/loop4")
        if last:
            env.fake.expect("losetup", "--detach", "/dev/loop3")
        await env.backend.remove(disk)
        assert not disk.store.exists()
    assert env.backend.loops.holders_of(env.base) == frozenset()

    for name in ("b", "b@flatten", "b@origin", "b@flatten@origin"):  # again: nothing left, nothing done
        env.expect_absent(f"wrenbox-{name}")
    env.expect_cow_loops("b")
    await env.backend.remove(b)


async def test_failed_create_releases_everything(env: Env) -> None:
    env.expect_absent("wrenbox-x")
    env.expect_base_loop()
    env.fake.expect("blockdev", "--getsize64", "/dev/loop3", out=f"{BASE_SIZE}\n")
    table = "0 8192 linear /dev/loop3 0\n8192 8192 zero\n"
    env.fake.expect(*CREATE, "wrenbox-x@origin", "--readonly", input=table.encode())
    env.fake.expect("losetup", "--find", "--show", str(env.cow("x")), out="/dev/loop4\n")
    env.fake.expect(
        *CREATE, "wrenbox-x",
        "--table", "0 16384 snapshot /dev/mapper/wrenbox-x@origin /dev/loop4 P 8",
        rc=1, err="device-mapper: reload ioctl on wrenbox-x failed: Invalid argument\n",
    )  # fmt: skip
    # undone newest first
    env.fake.expect("losetup", "--detach", "/dev/loop4")
    env.expect_removed("wrenbox-x@origin")
    env.fake.expect("losetup", "--detach", "/dev/loop3")

    with pytest.raises(CommandFailed, match="reload ioctl on wrenbox-x failed"):
        await env.backend.create(env.base, "x", size=8 * MiB)
    assert not env.cow("x").exists()
    assert env.backend.loops.holders_of(env.base) == frozenset()


async def test_cancelled_create_still_releases_everything(env: Env) -> None:
    env.expect_absent("wrenbox-x")
    env.expect_base_loop()
    env.fake.expect("blockdev", "--getsize64", "/dev/loop3", out=f"{BASE_SIZE}\n")
    env.fake.expect("losetup", "--find", "--show", str(env.cow("x")), out="/dev/loop4\n")
    table = "0 8192 snapshot /dev/loop3 /dev/loop4 P 8"
    env.fake.expect(*CREATE, "wrenbox-x", "--table", table, hang=True)
    env.fake.expect("losetup", "--detach", "/dev/loop4")
    env.fake.expect("losetup", "--detach", "/dev/loop3")

    with anyio.move_on_after(0.3) as scope:
        await env.backend.create(env.base, "x")
    assert scope.cancelled_caught
    assert not env.cow("x").exists()


async def test_create_refuses_an_existing_disk(env: Env) -> None:
    env.fake.expect("dmsetup", "info", "wrenbox-x", out="Name: wrenbox-x\n")
    with pytest.raises(AlreadyExists):
        await env.backend.create(env.base, "x")
    assert not env.cow("x").exists()


async def test_persist_keeps_the_cow_and_releases_the_devices(env: Env) -> None:
    disk = await env.create("x", size=8 * MiB)
    env.expect_removed("wrenbox-x")
    env.expect_removed("wrenbox-x@origin")
    env.expect_cow_loops("x", "/dev/loop4")
    env.fake.expect("losetup", "--detach", "/dev/loop3")
    assert await env.backend.persist(disk) == disk
    assert disk.store.exists()


async def test_remove_retries_while_busy(env: Env) -> None:
    disk = await env.create("x")
    env.expect_removed("wrenbox-x", busy=2)
    env.expect_absent("wrenbox-x@origin")
    env.expect_cow_loops("x", "/dev/loop4")
    env.fake.expect("losetup", "--detach", "/dev/loop3")
    await env.backend.persist(disk)


async def test_busy_five_times_200ms_apart_gives_up(tmp_path: Path, fake_runner: FakeRunner) -> None:
    env = Env(tmp_path, fake_runner)
    env.backend = DmSnapshotBackend(RootfsConfig(disks_dir=env.config.disks_dir), runner=fake_runner)
    assert (env.backend.config.remove_attempts, env.backend.config.remove_retry_delay) == (5, 0.2)
    disk = await env.create("x")
    env.fake.expect("dmsetup", "info", "wrenbox-x", out="Name: wrenbox-x\n")
    for _ in range(5):
        env.fake.expect(*REMOVE, "wrenbox-x", rc=1, err=BUSY)
    started = time.monotonic()
    with pytest.raises(InUse, match="still busy after 5 attempts"):
        await env.backend.persist(disk)
    assert 0.8 <= time.monotonic() - started < 2.0  # four waits between five attempts
    assert env.backend.loops.holders_of(env.base) == {"x"}  # nothing released under a busy device


async def test_other_remove_failures_are_not_retried(env: Env) -> None:
    disk = await env.create("x")
    env.fake.expect("dmsetup", "info", "wrenbox-x", out="Name: wrenbox-x\n")
    env.fake.expect(*REMOVE, "wrenbox-x", rc=1, err="device-mapper: remove ioctl failed: Invalid\n")
    with pytest.raises(CommandFailed, match="remove ioctl failed"):
        await env.backend.persist(disk)


async def test_restore_after_a_restart_adopts_the_existing_base_loop(env: Env) -> None:
    disk = await env.create("x", size=8 * MiB)
    env.expect_removed("wrenbox-x")
    env.expect_removed("wrenbox-x@origin")
    env.expect_cow_loops("x", "/dev/loop4")
    env.fake.expect("losetup", "--detach", "/dev/loop3")
    saved = (await env.backend.persist(disk)).model_dump_json()

    restarted = env.restarted()
    env.expect_absent("wrenbox-x")
    env.expect_absent("wrenbox-x@origin")
    env.expect_cow_loops("x")
    # another sandbox on the same base kept /dev/loop7 attached across the restart
    env.expect_base_loop(existing="/dev/loop7")
    env.expect_activate("x", 8 * MiB, "/dev/loop7", cow_loop="/dev/loop5")
    restored = await restarted.restore(Disk.from_json(saved))
    assert restored == disk
    assert restarted.loops.device_of(env.base) == "/dev/loop7"


async def test_restore_replaces_a_leftover_device(env: Env) -> None:
    disk = await env.create("x")
    restarted = env.restarted()
    env.expect_removed("wrenbox-x")  # still there from before a crash
    env.expect_absent("wrenbox-x@origin")
    env.expect_cow_loops("x", "/dev/loop4")
    env.expect_base_loop(existing="/dev/loop3")
    env.expect_activate("x", BASE_SIZE, "/dev/loop3", cow_loop="/dev/loop6")
    await restarted.restore(disk)


async def test_flatten_reads_a_temporary_device_into_a_sparse_image(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mapper = tmp_path / "mapper"  # stands in for /dev/mapper: the fake dm device is a file
    mapper.mkdir()
    monkeypatch.setattr(dm, "MAPPER", mapper)
    size = 8 * MiB
    disk = await env.create("f", size=size)
    env.expect_removed("wrenbox-f")
    env.expect_removed("wrenbox-f@origin")
    env.expect_cow_loops("f", "/dev/loop4")
    env.fake.expect("losetup", "--detach", "/dev/loop3")
    await env.backend.persist(disk)
    merged = env.content + bytes(2 * MiB) + b"\x5a" * MiB + bytes(MiB)
    (mapper / "wrenbox-f@flatten").write_bytes(merged)

    env.expect_absent("wrenbox-f")
    env.expect_absent("wrenbox-f@flatten")
    env.expect_absent("wrenbox-f@flatten@origin")
    env.expect_cow_loops("f")
    env.expect_base_loop()
    env.expect_activate("f", size, "/dev/loop3", role="flatten")
    env.expect_removed("wrenbox-f@flatten")  # the temporary stack, undone newest first
    env.fake.expect("losetup", "--detach", "/dev/loop4")
    env.expect_removed("wrenbox-f@flatten@origin")
    env.fake.expect("losetup", "--detach", "/dev/loop3")
    image = await env.backend.flatten(disk, tmp_path / "template.ext4")

    assert image.path.read_bytes() == merged
    assert image.size == size
    assert image.path.stat().st_blocks * 512 <= 3 * MiB + 64 * 1024  # 2 MiB of base data + 1 MiB written
    assert env.backend.loops.holders_of(env.base) == frozenset()


async def test_flatten_refuses_an_active_disk(env: Env, tmp_path: Path) -> None:
    disk = await env.create("x")
    env.fake.expect("dmsetup", "info", "wrenbox-x", out="Name: wrenbox-x\n")
    with pytest.raises(Conflict, match="persist it before flattening"):
        await env.backend.flatten(disk, tmp_path / "t.ext4")
    assert not (tmp_path / "t.ext4").exists()


async def test_reclaim_removes_what_no_live_disk_needs(env: Env) -> None:
    keep = await env.create("keep")
    gone_cow = env.cow("gone")
    gone_cow.write_bytes(b"")
    restarted = env.restarted()
    ls = (
        "wrenbox-keep\t(253:0)\nwrenbox-gone\t(253:1)\nwrenbox-gone@origin\t(253:2)\n"
        "wrenbox-keep@flatten\t(253, 3)\nvg0-root\t(253:4)\n"
    )
    env.fake.expect("dmsetup", "ls", out=ls)
    env.expect_removed("wrenbox-gone")  # snapshots first, then the origins below them
    env.expect_removed("wrenbox-keep@flatten")
    env.expect_removed("wrenbox-gone@origin")
    env.expect_base_loop(existing="/dev/loop3")  # the live disk's holder is rebuilt
    stray_image = env.images / "old-template.ext4"
    env.fake.expect(
        *COLS,
        out=loops_json(
            ("/dev/loop3", str(env.base), True),  # held by keep
            ("/dev/loop4", str(env.cow("keep")), False),  # keep's CoW
            ("/dev/loop5", f"{gone_cow} (deleted)", False),  # a dead disk's CoW
            ("/dev/loop6", str(stray_image), True),  # an unused image in our image roots
            ("/dev/loop7", "/srv/someone-else.img", True),  # not ours
            ("/dev/loop8", str(env.base), False),  # writable loop on a base: not ours either
        ),
    )
    env.fake.expect("losetup", "--detach", "/dev/loop5")
    env.fake.expect("losetup", "--detach", "/dev/loop6")

    reclaimed = await restarted.reclaim([keep])

    assert reclaimed == [
        "dm device wrenbox-gone",
        "dm device wrenbox-keep@flatten",
        "dm device wrenbox-gone@origin",
        f"loop device /dev/loop5 ({gone_cow})",
        f"loop device /dev/loop6 ({stray_image})",
        f"CoW store {gone_cow}",
    ]
    assert keep.store.exists()
    assert not gone_cow.exists()
    assert restarted.loops.holders_of(env.base) == {"keep"}


async def test_records_naming_foreign_devices_are_refused(env: Env) -> None:
    disk = await env.create("x")
    for forged in (
        disk.model_copy(update={"path": Path("/dev/mapper/vg0-root")}),
        disk.model_copy(update={"store": Path("/etc/passwd")}),
        disk.model_copy(update={"id": "../x"}),
    ):
        with pytest.raises(InvalidArgument):
            await env.backend.remove(forged)  # no command runs (the fake is strict)


async def test_udev_neither_manages_nor_probes_guest_written_devices(env: Env) -> None:
    # The exact scripts above already demand the switches; this states the property over a whole life.
    disk = await env.create("x", size=8 * MiB)  # with a grown origin: two devices
    env.expect_removed("wrenbox-x")
    env.expect_removed("wrenbox-x@origin")
    env.expect_cow_loops("x", "/dev/loop4")
    env.fake.expect("losetup", "--detach", "/dev/loop3")
    await env.backend.persist(disk)
    dm_changes = [argv for argv in env.fake.calls if {"create", "remove"} & set(argv[:4])]
    assert len(dm_changes) == 4
    assert all(argv[:3] == ("dmsetup", "--noudevrules", "--noudevsync") for argv in dm_changes)


def test_deploy_files_match_the_defaults() -> None:
    # The host-side half of the udev/LVM fix names wrenbox's defaults; they must not drift apart.
    deploy = Path(__file__).parents[2] / "deploy"
    prefix = RootfsConfig(disks_dir=Path("/x")).dm_prefix
    rules = (deploy / "udev" / "12-wrenbox.rules").read_text()
    assert f'ATTR{{dm/name}}=="{prefix}*"' in rules
    assert f'ATTR{{loop/backing_file}}=="{Settings.model_fields["data_dir"].default}/*"' in rules
    for flag in ("DISK", "OTHER", "SUBSYSTEM"):
        assert f'ENV{{DM_UDEV_DISABLE_{flag}_RULES_FLAG}}="1"' in rules
    lvm = (deploy / "lvm" / "wrenbox-filter.conf").read_text()
    line = f'global_filter = [ "r|^/dev/mapper/{prefix}|", "r|^/dev/disk/by-id/dm-name-{prefix}|" ]'
    assert line in lvm
    assert line in (dm.__doc__ or "")


def test_parse_dmsetup_ls() -> None:
    assert parse_dmsetup_ls("No devices found\n") == []
    assert parse_dmsetup_ls("") == []
    text = "wrenbox-a\t(253:0)\nwrenbox-a@origin\t(253, 1)\n\ngarbage line here\n"
    assert parse_dmsetup_ls(text) == ["wrenbox-a", "wrenbox-a@origin"]


def test_parse_losetup_json() -> None:
    assert parse_losetup_json("") == []
    text = json.dumps(
        {
            "loopdevices": [
                {"name": "/dev/loop0", "back-file": "/a (deleted)", "ro": True},
                {"name": "/dev/loop1", "back-file": "/b", "ro": "0"},
                {"name": "/dev/loop2", "back-file": "/c", "ro": "1"},
            ]
        }
    )
    parsed = [(lo.device, lo.backing_file, lo.read_only) for lo in parse_losetup_json(text)]
    assert parsed == [("/dev/loop0", "/a", True), ("/dev/loop1", "/b", False), ("/dev/loop2", "/c", True)]


@pytest.mark.parametrize("size", [MiB, 4 * MiB + 512, 1 << 30, 5 << 30])
def test_cow_store_holds_a_full_rewrite(size: int) -> None:
    chunks = -(-size // 4096)
    metadata_chunks = -(-chunks // 256) + 1  # exceptions + header
    assert cow_size(size) >= size + metadata_chunks * 4096
    assert cow_size(size) % MiB == 0
    assert cow_size(size) - size < size // 128 + 2 * MiB  # not wastefully large


# A real run ---------------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.skipif(
    not device_mapper_available(),
    reason="no device-mapper in this kernel (not in /proc/misc, /dev/mapper/control does not open)",
)
async def test_real_device_mapper_round_trip(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    base = images / "base.ext4"
    content = make_base(base, size=BASE_SIZE)
    backend = DmSnapshotBackend(RootfsConfig(disks_dir=tmp_path / "disks", image_roots=(images,)))
    disk = await backend.create(base, "realdm", size=8 * MiB)
    try:
        assert disk.path.read_bytes() == content + bytes(4 * MiB)
        overwrite(disk.path, 6 * MiB, b"\x33" * MiB)
        expected = content + bytes(2 * MiB) + b"\x33" * MiB + bytes(MiB)
        await backend.persist(disk)

        backend = DmSnapshotBackend(backend.config)  # as after a restart
        restored = await backend.restore(disk)
        assert restored.path.read_bytes() == expected
        await backend.persist(restored)
        image = await backend.flatten(disk, tmp_path / "template.ext4")
        assert image.path.read_bytes() == expected
        assert base.read_bytes() == content
    finally:
        await backend.remove(disk)
        assert await backend.reclaim([]) == []
