"""Crash safety: a manager process SIGKILLed at a precise step of create, pause, resume, snapshot, fork
and destroy (or after its VM was lost); a new manager starts, recovers, and then:

- the sandbox that was being worked on ended in the one state recovery.py's table gives for where the
  kill came (written out below per point, not asked of the code under test);
- its data is what that state implies: the files written before the killed operation are intact as the
  guest reads them back from its disk, after a resume where it ended paused;
- every VMM process belongs to a sandbox on record, no half-made template is listed;
- a sandbox paused before all the crashes is untouched, byte for byte, and still resumes with its data;
- once every sandbox but that one is destroyed, the host holds exactly what it held before the test
  (processes, netns, links, RAM files, disks, cgroups, loop and dm devices, the nft table), and the test
  process exactly the file descriptors it had.

Each case kills at the first time its point is reached in the last operation of its script.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from tests.support.images import scratch_data_dir

from wrenbox import command
from wrenbox.config import Settings
from wrenbox.manager import CreateRequest, SandboxManager
from wrenbox.manager.store import Store
from wrenbox.names import new_sandbox_id
from wrenbox.pids import ProcessRef
from wrenbox.records import SandboxRecord, SandboxState, TemplateState
from wrenbox.runtime.sweep import our_processes
from wrenbox.service import ensure_template, open_manager

from .conftest import delete_templates, footprint, make_settings, open_fds, take_down
from .crash_worker import crash
from .guest import Contents, run, tree

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.root, pytest.mark.slow]
S = SandboxState
BEFORE = Contents.seeded("before")  # written by every script before the operation it kills
RUNNING_HOLDS = {"slot", "disk", "memory", "vm"}
PAUSED_HOLDS = {"disk", "snapshot"}


@pytest.fixture(scope="module")
def crash_settings() -> Iterator[Settings]:
    """A data dir of its own: crash tests restart managers, which sweep whatever no record names."""
    root = scratch_data_dir("wbc-")
    s = make_settings(root, "wbc", 43, on_shutdown="pause")
    yield s
    left = take_down(s)
    shutil.rmtree(root, ignore_errors=True)
    assert left == {}, f"crash tests left things behind: {left}"
    assert footprint(s) == {}, "the network's teardown left its host table"


@dataclass(frozen=True)
class Bystander:
    """A sandbox paused before any of the crashes, and what the host held then."""

    id: str
    record: SandboxRecord
    host: dict[str, list[str]]  # footprint()
    files: dict[str, dict[str, tuple[int, str]]]  # sandbox dirs and disks, byte for byte


def host_files(settings: Settings) -> dict[str, dict[str, tuple[int, str]]]:
    return {"sandboxes": tree(settings.sandboxes_dir), "disks": tree(settings.data_dir / "disks")}


@pytest.fixture(scope="module")
def bystander(crash_settings: Settings) -> Iterator[Bystander]:
    contents = Contents.seeded("bystander")

    async def make() -> SandboxRecord:
        async with open_manager(crash_settings, reaper=False) as mgr:
            await ensure_template(mgr, crash_settings)
            sb = await mgr.create(CreateRequest(metadata={"role": "bystander"}))
            await contents.write(mgr, sb.id)
            return await mgr.pause(sb.id)

    rec = anyio.run(make)
    yield Bystander(rec.id, rec, footprint(crash_settings), host_files(crash_settings))

    async def check_and_destroy() -> None:
        async with open_manager(crash_settings, reaper=False) as mgr:
            await mgr.resume(rec.id)
            assert await contents.check(mgr, rec.id) == []
            await mgr.destroy(rec.id)

    anyio.run(check_and_destroy)


@asynccontextmanager
async def restarted(settings: Settings, bystander: Bystander) -> AsyncIterator[SandboxManager]:
    """A new manager after the crash (it recovers as it opens), for the test to look at the crashed
    sandbox; then the checks every crash shares, and everything but the bystander destroyed."""
    fds = open_fds()
    async with open_manager(settings, reaper=False) as mgr:
        assert all(t.state is TemplateState.READY for t in mgr.templates())
        assert not list(settings.templates_dir.glob(".build-*"))
        held = {
            (r.resources["vm"]["pid"], r.resources["vm"]["start_time"])
            for r in mgr.list()
            if "vm" in r.resources
        }
        assert {(p.pid, p.start_time) for p in our_processes([settings.data_dir])} == held
        left_alone = mgr.get(bystander.id)
        assert (left_alone.state, left_alone.resources) == (S.PAUSED, bystander.record.resources)
        try:
            yield mgr
        finally:  # a failed check above, too: the next case starts from the bystander alone
            with anyio.CancelScope(shield=True):
                for rec in mgr.list():
                    if rec.id != bystander.id:
                        await mgr.destroy(rec.id)
                await delete_templates(mgr)
        assert [t.name for t in mgr.templates()] == ["minimal"]
    assert footprint(settings) == bystander.host
    assert host_files(settings) == bystander.files
    assert open_fds() == fds


async def ended(mgr: SandboxManager, sandbox_id: str, expected: SandboxState) -> SandboxRecord:
    rec = mgr.get(sandbox_id)
    assert rec.state is expected, f"{sandbox_id} ended {rec.state.value} ({rec.error}), not {expected.value}"
    if expected is S.RUNNING:  # (a resumed one also holds its snapshot and the disk's checkpoint)
        assert set(rec.resources) >= RUNNING_HOLDS, rec.resources
    else:  # a sandbox in error keeps its disk, for a look or a destroy
        assert set(rec.resources) == {S.PAUSED: PAUSED_HOLDS, S.DESTROYED: set(), S.ERROR: {"disk"}}[expected]
    return rec


async def intact(mgr: SandboxManager, sandbox_id: str, contents: Contents = BEFORE) -> None:
    """The files written before the crash read back from the disk as written (resumed if paused)."""
    if mgr.get(sandbox_id).state is S.PAUSED:
        await mgr.resume(sandbox_id)
    assert await contents.check(mgr, sandbox_id) == []


# Where each kill point lies in its operation decides the one state recovery must produce.
CREATE = {
    "create.slot": S.DESTROYED,  # a create that never answered gives everything back
    "create.disk": S.DESTROYED,
    "create.started": S.DESTROYED,  # a VM running but not on record: the sweep ends it
    "create.vm": S.DESTROYED,
    "create.init": S.DESTROYED,  # the agent took its /init, the caller never got the sandbox
    "state.running": S.RUNNING,  # the create was recorded complete: its VM is adopted
}
PAUSE = {
    "state.pausing": S.RUNNING,  # the VM was not stopped yet: it goes on running
    "pause.stop": S.RUNNING,
    "pause.vmstate": S.RUNNING,  # stopped, its state half written: the VM is continued
    "pause.memory": S.RUNNING,
    "pause.committed": S.PAUSED,  # the snapshot is on disk: the pause is finished
    "pause.released": S.PAUSED,  # the VM already given back: the rest is given back too
    "state.paused": S.PAUSED,
}
RESUME = {
    "state.resuming": S.PAUSED,  # no VM yet: back to the snapshot, which is untouched
    "resume.disk": S.PAUSED,  # the disk's checkpoint is taken: it reverts to it
    "resume.slot": S.PAUSED,
    "resume.memory": S.PAUSED,
    "resume.started": S.PAUSED,  # a VM running but not on record: swept, and the disk reverted
    "resume.vm": S.RUNNING,  # the VM runs: the resume is finished (agent /init)
    "resume.init": S.RUNNING,
}


@pytest.mark.parametrize("point", CREATE)
async def test_kill_during_create(crash_settings: Settings, bystander: Bystander, point: str) -> None:
    sid = new_sandbox_id()
    crash(crash_settings, point, sid, "create")
    async with restarted(crash_settings, bystander) as mgr:
        if (await ended(mgr, sid, CREATE[point])).state is S.RUNNING:
            assert await run(mgr, sid, "echo alive") == "alive\n"


@pytest.mark.parametrize("point", PAUSE)
async def test_kill_during_pause(crash_settings: Settings, bystander: Bystander, point: str) -> None:
    sid = new_sandbox_id()
    crash(crash_settings, point, sid, "create", "write:before", "pause")
    async with restarted(crash_settings, bystander) as mgr:
        await ended(mgr, sid, PAUSE[point])
        await intact(mgr, sid)


@pytest.mark.parametrize("point", RESUME)
async def test_kill_during_resume(crash_settings: Settings, bystander: Bystander, point: str) -> None:
    sid = new_sandbox_id()
    crash(crash_settings, point, sid, "create", "write:before", "pause", "resume")
    async with restarted(crash_settings, bystander) as mgr:
        await ended(mgr, sid, RESUME[point])
        await intact(mgr, sid)


SNAPSHOT = ["state.snapshotting", "snapshot.write", "snapshot.published"]


@pytest.mark.parametrize("point", SNAPSHOT)
@pytest.mark.parametrize("source", [S.RUNNING, S.PAUSED])
async def test_kill_during_snapshot(
    crash_settings: Settings, bystander: Bystander, point: str, source: SandboxState
) -> None:
    sid = new_sandbox_id()
    pause = ["pause"] if source is S.PAUSED else []
    crash(crash_settings, point, sid, "create", "write:before", *pause, "snapshot:crashed")
    async with restarted(crash_settings, bystander) as mgr:
        # The source comes back as it was; the template exists, complete, once it was published.
        await ended(mgr, sid, source)
        await intact(mgr, sid)
        names = {t.name for t in mgr.templates()}
        if point == "snapshot.published":
            assert names == {"minimal", "crashed"}
            made = await mgr.create(CreateRequest(template="crashed"))
            await intact(mgr, made.id)
        else:
            assert names == {"minimal"}
            assert not (crash_settings.templates_dir / "crashed").exists()


FORK = {  # point: how many children stay
    "state.snapshotting": 0,
    "snapshot.write": 0,
    "snapshot.published": 0,  # its template is complete, but no child uses it: recovery deletes it
    "state.running": 0,  # the source is back running, no child made yet
    "create.vm": 0,  # the first child is being made: given back like any create cut short
    "fork.child": 1,  # the first child was made: it stays, running, with the source's data
}


@pytest.mark.parametrize("point", FORK)
async def test_kill_during_fork(crash_settings: Settings, bystander: Bystander, point: str) -> None:
    sid = new_sandbox_id()
    crash(crash_settings, point, sid, "create", "write:before", "fork:2")
    async with restarted(crash_settings, bystander) as mgr:
        await ended(mgr, sid, S.RUNNING)
        await intact(mgr, sid)
        children = [r.id for r in mgr.list() if r.id not in (sid, bystander.id)]
        assert len(children) == FORK[point], f"children: {children}"
        for child in children:
            await ended(mgr, child, S.RUNNING)
            await intact(mgr, child)
        forks = {t.name for t in mgr.templates() if t.name.startswith(f"fork-{sid}-")}
        assert len(forks) == min(1, FORK[point]), f"fork templates: {forks}"


DESTROY = [  # (the sandbox's state, point): all end destroyed, everything given back
    (S.RUNNING, "state.stopping"),  # nothing released yet
    (S.RUNNING, "release.vm"),  # the VM is gone but still on record; slot, RAM file and disk held
    (S.RUNNING, "release.disk"),  # only the slot is left
    (S.PAUSED, "release.snapshot"),  # the snapshot is gone but still on record; the disk held
]


@pytest.mark.parametrize(("state", "point"), DESTROY)
async def test_kill_during_destroy(
    crash_settings: Settings, bystander: Bystander, state: SandboxState, point: str
) -> None:
    sid = new_sandbox_id()
    pause = ["pause"] if state is S.PAUSED else []
    crash(crash_settings, point, sid, "create", "write:before", *pause, "destroy")
    async with restarted(crash_settings, bystander) as mgr:
        await ended(mgr, sid, S.DESTROYED)


def kill_vm(settings: Settings, sandbox_id: str) -> None:
    """SIGKILL the sandbox's VMM (no manager running): the VM is lost, as when the host reboots."""
    with Store(settings.state_db) as store:
        vm = store.get_sandbox(sandbox_id).resources["vm"]
    process = ProcessRef(vm["pid"], vm["start_time"])
    assert process.signal(signal.SIGKILL), "the VM was gone before it was killed"
    assert process.wait_gone(30)


async def test_a_vm_lost_before_any_pause_ends_in_error(
    crash_settings: Settings, bystander: Bystander
) -> None:
    """A never-paused sandbox whose VM is lost while no manager runs has nothing to go back to."""
    sid = new_sandbox_id()
    crash(crash_settings, "-", sid, "create", "write:before", "die")
    kill_vm(crash_settings, sid)
    async with restarted(crash_settings, bystander) as mgr:
        rec = await ended(mgr, sid, S.ERROR)
        assert "never paused" in (rec.error or "")


async def test_a_vm_lost_after_a_resume_goes_back_to_its_last_pause(
    crash_settings: Settings, bystander: Bystander, tmp_path: Path
) -> None:
    """Its disk goes back to the checkpoint of that pause: what the guest wrote since (synced to the
    disk) is gone, block for block; what it wrote before is there."""
    sid = new_sandbox_id()
    crash(crash_settings, "-", sid, "create", "write:before", "pause", "die")
    with Store(crash_settings.state_db) as store:
        disk = Path(store.get_sandbox(sid).resources["disk"]["store"])
    at_pause = tmp_path / "at-pause.qcow2"
    shutil.copyfile(disk, at_pause)  # (it names its backing file by absolute path: still the same)
    crash(crash_settings, "-", sid, "resume", "write:after", "exec:sync", "die")
    kill_vm(crash_settings, sid)
    async with restarted(crash_settings, bystander) as mgr:
        rec = await ended(mgr, sid, S.PAUSED)
        assert "last pause" in (rec.error or "")
        # Compared on the host: the guest's page cache (restored from the pause) could hide a disk
        # that went on with the lost VM's writes.
        same = command.run(["qemu-img", "compare", "-U", "-q", str(at_pause), str(disk)], check=False)
        assert same.returncode == 0, "the disk did not go back to the pause"
        await intact(mgr, sid)
