"""A full data filesystem: pausing or snapshotting a real sandbox fails with StorageFull, writes nothing
that is then listed or left behind, and keeps the sandbox running; once space is freed the same call
succeeds with the data intact. A guest that grows its disk meanwhile gets I/O errors, and no other
sandbox loses anything.

The data dir is a small ext4 filesystem on a loop device of this module's own (only the cached image and
host probe are shared, by symlink), so sandboxes' disks, snapshots and templates all land on it.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from tests.support.images import share_cache

from wrenbox.config import Settings
from wrenbox.errors import StorageFull
from wrenbox.manager import CreateRequest, SandboxManager
from wrenbox.manager.reserve import Reserve
from wrenbox.records import SandboxState
from wrenbox.service import Host, ensure_template, open_host

from .conftest import delete_templates, leftovers, make_settings, take_down
from .guest import Contents, run

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.root]
S = SandboxState
FS_MIB = 1024  # the minimal template (~450 MiB) and a few sandboxes, with room to spare until filled
FILLER = "filler"


def _run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


@pytest.fixture(scope="module")
def small_fs() -> Iterator[Path]:
    """A mounted ext4 filesystem of FS_MIB under /var/tmp, removed afterwards with its backing file."""
    root = Path(f"/var/tmp/wbd-{secrets.token_hex(3)}")
    backing = root.with_name(f"{root.name}.img")
    root.mkdir()
    try:
        _run("truncate", "-s", f"{FS_MIB}M", backing)
        _run("mkfs.ext4", "-q", "-m", "0", backing)  # no blocks reserved for root: full means full
        _run("mount", "-o", "loop", backing, root)
        try:
            share_cache(root)
            yield root
        finally:
            _run("umount", root)
    finally:
        backing.unlink(missing_ok=True)
        root.rmdir()


@pytest.fixture(scope="module")
def settings(small_fs: Path) -> Iterator[Settings]:
    s = make_settings(small_fs, "wbd", 51)
    yield s
    left = take_down(s)
    assert left == {}, f"the disk-full tests left things behind: {left}"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # module-wide, so that the host below is too


@pytest.fixture(scope="module")
async def host(settings: Settings) -> AsyncIterator[Host]:
    """One host and its template for the module (building the template is most of its cost)."""
    async with open_host(settings, reaper=False) as host:
        mgr = host.manager
        await ensure_template(mgr, settings)
        yield host
        assert [t.name for t in mgr.templates()] == ["minimal"]


@pytest.fixture
async def manager(host: Host, settings: Settings) -> AsyncIterator[SandboxManager]:
    """The module's manager; after each test the space is freed and its sandboxes and templates go."""
    mgr = host.manager
    try:
        yield mgr
    finally:
        free(settings.data_dir)
        with anyio.CancelScope(shield=True):
            for rec in mgr.list():
                await mgr.destroy(rec.id)
            await delete_templates(mgr)


def fill(root: Path, leave: int = 0) -> None:
    """Take the filesystem's free blocks but ``leave`` bytes: one big allocation, then (to fill it up
    completely) 4 KiB writes until ENOSPC."""
    st = os.statvfs(root)
    fd = os.open(root / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - leave - (1 << 20))
        while not leave and _written(fd, b"\xff" * 4096):
            pass
    finally:
        os.close(fd)
    free_now = os.statvfs(root).f_bavail * st.f_frsize
    assert free_now <= leave + (1 << 20), free_now


def _written(fd: int, data: bytes) -> bool:
    """Write and sync ``data``; False once the filesystem has no room for it."""
    try:
        os.write(fd, data)
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return False
    return True


def free(root: Path) -> None:
    (root / FILLER).unlink(missing_ok=True)


def free_bytes(root: Path) -> int:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


def temporaries(settings: Settings) -> list[str]:
    """Half-written files or directories anywhere in the data dir (the shared image cache aside)."""
    found = []
    for top in (settings.sandboxes_dir, settings.templates_dir, settings.data_dir / "disks"):
        found += [str(p.relative_to(settings.data_dir)) for p in top.rglob("*") if ".tmp" in p.name]
    return found


# Full: the store itself cannot record the pause, which fails before anything is done. Nearly full
# (room for the store's few pages, not for a snapshot): the snapshot's writing fails and is thrown away.
@pytest.mark.parametrize(
    ("leave", "refused_by"), [(0, "the store"), (8 << 20, "pausing sandbox")], ids=["full", "nearly-full"]
)
async def test_a_pause_on_a_full_disk_keeps_it_running_and_works_once_space_is_freed(
    manager: SandboxManager, host: Host, settings: Settings, leave: int, refused_by: str
) -> None:
    sb = await manager.create(CreateRequest())
    contents = Contents.random(1 << 20)
    await contents.write(manager, sb.id)
    await run(manager, sb.id, "sync", user="root")
    running = manager.get(sb.id)
    held = leftovers(settings)
    snapshot_dir = host.runtime.files.snapshot_dir(sb.id)

    fill(settings.data_dir, leave)
    for _ in range(2):  # and again: a failed pause leaves nothing in the way of the next one
        with pytest.raises(StorageFull, match=f"{refused_by}.*free space"):
            await manager.pause(sb.id)
        rec = manager.get(sb.id)
        assert (rec.state, rec.host_ip, set(rec.resources)) == (
            S.RUNNING,
            running.host_ip,
            set(running.resources),
        )
        assert not snapshot_dir.exists()
        assert temporaries(settings) == []
        assert leftovers(settings) == held
        assert await run(manager, sb.id, "echo alive") == "alive\n"
    free(settings.data_dir)

    await manager.pause(sb.id)
    assert manager.get(sb.id).state is S.PAUSED
    await manager.resume(sb.id)
    assert await contents.check(manager, sb.id) == []


async def test_a_disk_filling_up_under_a_pause_still_settles_it_and_a_destroy_frees_space(
    manager: SandboxManager, host: Host, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's own writes meet the full disk too (the pause's records, its move back to running,
    a destroy's): its reserve lets them land, so nothing is stranded in a transient state."""
    sb, other = [await manager.create(CreateRequest()) for _ in range(2)]
    contents = Contents.random(1 << 20)
    await contents.write(manager, sb.id)
    await run(manager, sb.id, "sync", user="root")
    reserve = Reserve.beside(settings.state_db)
    assert reserve.held() == reserve.size
    pause = host.runtime.pause

    async def pause_on_a_disk_filling_up(*args: object, **kwargs: object) -> object:
        fill(settings.data_dir)  # once the pause has begun: all that is written from here finds no room
        return await pause(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(host.runtime, "pause", pause_on_a_disk_filling_up)
    with pytest.raises(StorageFull, match="free space"):
        await manager.pause(sb.id)
    monkeypatch.undo()
    assert manager.get(sb.id).state is S.RUNNING
    assert 0 < reserve.held() < reserve.size  # the store needed it, and some of it is left
    assert await run(manager, sb.id, "echo alive") == "alive\n"

    fill(settings.data_dir)  # what the drawn chunks gave back is taken too
    full = free_bytes(settings.data_dir)
    with pytest.raises(StorageFull, match=r"reserve.*free space"):  # nothing new begins now
        await manager.pause(sb.id)
    assert manager.get(sb.id).state is S.RUNNING
    await manager.destroy(other.id)  # but a destroy, which is how a user frees space, goes through
    assert manager.get(other.id).state is S.DESTROYED
    assert free_bytes(settings.data_dir) > full
    free(settings.data_dir)

    await manager.pause(sb.id)
    assert reserve.held() == reserve.size  # made whole again before the pause began
    await manager.resume(sb.id)
    assert await contents.check(manager, sb.id) == []


async def test_a_snapshot_on_a_full_disk_lists_no_template_and_works_once_space_is_freed(
    manager: SandboxManager, settings: Settings
) -> None:
    sb = await manager.create(CreateRequest())
    contents = Contents.random(1 << 20)
    await contents.write(manager, sb.id)
    await run(manager, sb.id, "sync", user="root")
    on_disk = sorted(p.name for p in settings.templates_dir.iterdir())

    fill(settings.data_dir, 8 << 20)
    with pytest.raises(StorageFull, match=r"template full-disk from sandbox .*free space"):
        await manager.snapshot(sb.id, "full-disk")
    assert [t.name for t in manager.templates()] == ["minimal"]
    assert sorted(p.name for p in settings.templates_dir.iterdir()) == on_disk
    assert temporaries(settings) == []
    assert manager.get(sb.id).state is S.RUNNING
    assert await run(manager, sb.id, "echo alive") == "alive\n"
    free(settings.data_dir)

    await manager.snapshot(sb.id, "full-disk")
    child = await manager.create(CreateRequest(template="full-disk"))
    assert await contents.check(manager, child.id) == []
    assert await contents.check(manager, sb.id) == []


async def test_a_guest_growing_its_disk_on_a_full_host_gets_io_errors_and_harms_no_one_else(
    manager: SandboxManager, settings: Settings
) -> None:
    paused, running, grower = [await manager.create(CreateRequest()) for _ in range(3)]
    kept = {sb.id: Contents.random(1 << 20) for sb in (paused, running)}
    for sandbox_id, contents in kept.items():
        await contents.write(manager, sandbox_id)
        await run(manager, sandbox_id, "sync", user="root")
    await manager.pause(paused.id)

    fill(settings.data_dir)
    # 16 MiB of new clusters in its qcow2 overlay, which the host cannot store: the guest's writes fail
    # (its ext4 aborts its journal and goes read-only) while its VM keeps running and answering.
    grow = await manager.exec(
        grower.id, "dd if=/dev/urandom of=/home/user/big bs=1M count=16 conv=fsync", user="root"
    )
    assert grow.exit_code != 0
    assert re.search(rb"Input/output error|Read-only file system", grow.stderr), grow.stderr
    assert manager.get(grower.id).state is S.RUNNING
    free(settings.data_dir)

    assert await run(manager, grower.id, "echo alive") == "alive\n"
    assert await kept[running.id].check(manager, running.id) == []
    await manager.resume(paused.id)
    assert await kept[paused.id].check(manager, paused.id) == []
