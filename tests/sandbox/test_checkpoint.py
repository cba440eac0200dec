"""A sandbox's disk goes back with its memory: the disk checkpoint taken at every resume.

A resume continues the VM before it knows the resume worked; if it then fails, the sandbox returns to
its paused memory, and the disk must return too (else the guest's page cache and its filesystem
disagree). The same holds when the host loses a resumed VM: the sandbox goes back to its last pause.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import anyio
import pytest

from wrenbox import faults
from wrenbox.config import Settings
from wrenbox.manager import CreateRequest, SandboxManager
from wrenbox.manager.store import Store
from wrenbox.names import new_sandbox_id
from wrenbox.pids import ProcessRef
from wrenbox.records import SandboxRecord, SandboxState
from wrenbox.rootfs import Disk
from wrenbox.runtime.host import HostRuntime
from wrenbox.service import Host, open_manager

from .crash_worker import crash
from .guest import run

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.root]
S = SandboxState
# Writes and syncs to the disk every 20 ms from the moment the VM runs again.
WRITER = "while true; do date +%s%N >> /home/user/ticks; sync; sleep 0.02; done"


def disk_of(mgr: SandboxManager, sandbox_id: str) -> Disk:
    return Disk.model_validate(mgr.get(sandbox_id).resources["disk"])


def same_disk(a: Path, b: Path) -> bool:
    done = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True, check=False)
    return done.returncode == 0


def write_then_fail(rt: HostRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next resume fail right after the guest wrote and synced to its disk (so the VM is known
    to have run and changed the disk before the failure)."""
    original = rt._init_agent

    async def init_write_fail(rec: SandboxRecord) -> None:
        await original(rec)
        await rt.envd(rec).processes.exec("echo after-resume >> /home/user/poke; sync")
        raise faults.InjectedFault("the resume fails after the guest wrote to its disk")

    monkeypatch.setattr(rt, "_init_agent", init_write_fail)


async def paused_with_a_busy_writer(mgr: SandboxManager, tmp: Path) -> tuple[str, Path]:
    """A paused sandbox whose guest writes to disk as soon as it runs; and a copy of its paused disk."""
    sb = await mgr.create(CreateRequest())
    async with mgr.use(sb.id) as envd:
        await envd.processes.start(WRITER, tag="writer")
    await anyio.sleep(0.3)
    await mgr.pause(sb.id)
    copy = tmp / "paused-disk"
    shutil.copyfile(disk_of(mgr, sb.id).store, copy)
    return sb.id, copy


async def test_a_failed_resume_puts_the_disk_back(
    host: Host, manager: SandboxManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid, paused_disk = await paused_with_a_busy_writer(manager, tmp_path)
    with monkeypatch.context() as m:
        write_then_fail(host.runtime, m)
        with pytest.raises(faults.InjectedFault):
            await manager.resume(sid)
    assert manager.get(sid).state is S.PAUSED
    assert same_disk(paused_disk, disk_of(manager, sid).store)
    # And it resumes for real, the writer still going.
    await manager.resume(sid)
    await anyio.sleep(0.2)
    before = int(await run(manager, sid, "wc -l < /home/user/ticks"))
    await anyio.sleep(0.2)
    assert int(await run(manager, sid, "wc -l < /home/user/ticks")) > before


async def test_without_the_revert_the_disk_would_be_ahead(
    host: Host, manager: SandboxManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test above can fail: with reverting switched off, the same failed resume leaves the disk
    changed by the guest."""
    sid, paused_disk = await paused_with_a_busy_writer(manager, tmp_path)
    rootfs = host.runtime.rootfs

    async def keep(disk: Disk) -> None:
        await rootfs.drop_checkpoint(disk)

    monkeypatch.setattr(rootfs, "revert", keep)
    write_then_fail(host.runtime, monkeypatch)
    with pytest.raises(faults.InjectedFault):
        await manager.resume(sid)
    assert not same_disk(paused_disk, disk_of(manager, sid).store)


async def test_a_vm_lost_after_a_resume_comes_back_paused_at_the_last_pause(settings: Settings) -> None:
    sid = new_sandbox_id()
    ops = [
        "create",
        "exec:echo before > /home/user/before; sync",
        "pause",
        "resume",
        "exec:echo after > /home/user/after; sync",
        "die",  # the manager dies; its VM lives on
    ]
    await anyio.to_thread.run_sync(lambda: crash(settings, "never.reached", sid, *ops))
    with Store(settings.state_db) as store:
        vm = store.get_sandbox(sid).resources["vm"]
    ProcessRef(vm["pid"], vm["start_time"]).terminate()  # ... and then the VM is lost too
    async with open_manager(settings, reaper=False) as mgr:
        rec = mgr.get(sid)
        assert rec.state is S.PAUSED
        assert "last pause" in (rec.error or "")
        await mgr.resume(sid)
        assert (await run(mgr, sid, "cat /home/user/before")).strip() == "before"
        missing = await run(mgr, sid, "ls /home/user/after 2>&1 || true")
        assert missing.strip().endswith("No such file or directory")
        await mgr.destroy(sid)
