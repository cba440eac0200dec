"""Crash safety: a manager process SIGKILLed at a precise step of create, pause, resume, snapshot and
fork; a new manager starts, recovers, and then:

- no QEMU process, namespace, link, RAM file, disk or directory is left that no sandbox holds;
- the sandbox that was being worked on ended where recovery.py says it must, and is usable (or
  destroyable) from there;
- a sandbox that was paused before the kill still resumes, with its data;
- no half-written template is listed.

Each case kills at the first time its point is reached; the points cover every step that acquires
something (see ``wrenbox.faults`` and the ``faults.point`` calls in the runtime and manager).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from tests.support.images import scratch_data_dir
from tests.support.ranges import suite_ranges

from wrenbox.config import Settings
from wrenbox.manager import CreateRequest, SandboxManager
from wrenbox.names import new_sandbox_id
from wrenbox.network import Network, NetworkConfig
from wrenbox.records import SandboxState, TemplateState
from wrenbox.runtime.sweep import our_processes
from wrenbox.service import ensure_template, open_manager

from .conftest import delete_templates, leftovers, make_settings
from .crash_worker import crash

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.root, pytest.mark.slow]
S = SandboxState
BYSTANDER_FILE = "/home/user/bystander.bin"


@pytest.fixture(scope="module")
def crash_settings() -> Iterator[Settings]:
    """A data dir of its own: crash tests restart managers, which sweep whatever no record names."""
    root = scratch_data_dir("wbc-")
    tag = secrets.token_hex(2)
    s = make_settings(
        root,
        tag,
        on_shutdown="pause",
        memory_dir=Path(f"/dev/shm/wbc-{tag}"),
        network=NetworkConfig(prefix=f"wbc{tag}", **suite_ranges(43)),
    )
    yield s
    left = leftovers(s)
    anyio.run(Network(s.network).teardown)
    shutil.rmtree(s.memory_dir, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    assert left == {}, f"crash tests left things behind: {left}"


@pytest.fixture(scope="module")
def bystander(crash_settings: Settings) -> Iterator[dict[str, str]]:
    """A sandbox paused (with a file on its disk) before any of the crashes."""
    data = os.urandom(1 << 20)

    async def make() -> str:
        async with open_manager(crash_settings, reaper=False) as mgr:
            await ensure_template(mgr, crash_settings)
            sb = await mgr.create(CreateRequest(metadata={"role": "bystander"}))
            async with mgr.use(sb.id) as envd:
                await envd.files.upload(BYSTANDER_FILE, data)
            await mgr.pause(sb.id)
            return sb.id

    sandbox_id = anyio.run(make)
    yield {"id": sandbox_id, "sha256": hashlib.sha256(data).hexdigest()}

    async def destroy() -> None:
        async with open_manager(crash_settings, reaper=False) as mgr:
            await mgr.destroy(sandbox_id)

    anyio.run(destroy)


async def check_after_restart(
    settings: Settings, bystander: dict[str, str], sandbox_id: str, expected: set[SandboxState]
) -> None:
    async with open_manager(settings, reaper=False) as mgr:
        rec = mgr.get(sandbox_id) if _exists(mgr, sandbox_id) else None
        if rec is not None:
            assert rec.state in expected, f"{sandbox_id} ended {rec.state.value}, expected {expected}"
        # Nothing half-done is listed, and every VMM process belongs to a sandbox on record.
        assert all(t.state is TemplateState.READY for t in mgr.templates())
        assert not [p for p in (settings.templates_dir).glob(".build-*")]
        held = {
            (r.resources["vm"]["pid"], r.resources["vm"]["start_time"])
            for r in mgr.list()
            if "vm" in r.resources
        }
        assert {(p.pid, p.start_time) for p in our_processes([settings.data_dir])} == held
        # Whatever state it ended in, the sandbox works from there.
        if rec is not None and rec.state is S.PAUSED:
            rec = await mgr.resume(sandbox_id)
        if rec is not None and rec.state is S.RUNNING:
            assert (await mgr.exec(sandbox_id, "echo alive")).stdout == b"alive\n"
        # The sandbox paused before the crash resumes with its data.
        await mgr.resume(bystander["id"])
        result = await mgr.exec(bystander["id"], f"sha256sum {BYSTANDER_FILE}")
        assert result.stdout.split()[0].decode() == bystander["sha256"]
        await mgr.pause(bystander["id"])
        await _destroy_all_but(mgr, bystander["id"])
    assert set(leftovers(settings)) <= {"sandbox dirs", "disks"}  # the bystander's, and only its
    assert leftovers(settings).get("sandbox dirs") == [bystander["id"]]


def _exists(mgr: SandboxManager, sandbox_id: str) -> bool:
    try:
        mgr.get(sandbox_id)
    except Exception:
        return False
    return True


async def _destroy_all_but(mgr: SandboxManager, keep: str) -> None:
    for rec in mgr.list():
        if rec.id != keep:
            await mgr.destroy(rec.id)
    await delete_templates(mgr)


CREATE = ["create.slot", "create.disk", "create.started", "create.vm", "create.init", "state.running"]
PAUSE = [
    "state.pausing",
    "pause.stop",
    "pause.vmstate",
    "pause.memory",
    "pause.committed",
    "pause.released",
    "state.paused",
]
RESUME = [
    "state.resuming",
    "resume.disk",
    "resume.slot",
    "resume.memory",
    "resume.started",
    "resume.vm",
    "resume.init",
]
SNAPSHOT = ["state.snapshotting", "snapshot.write"]


@pytest.mark.parametrize("point", CREATE)
async def test_kill_during_create(crash_settings: Settings, bystander: dict[str, str], point: str) -> None:
    sid = new_sandbox_id()
    assert crash(crash_settings, point, sid, "create") == []
    # Killed before create returned: gone, unless the kill came after its final state was written.
    allowed = {S.DESTROYED, S.RUNNING} if point == "state.running" else {S.DESTROYED}
    await check_after_restart(crash_settings, bystander, sid, allowed)


@pytest.mark.parametrize("point", PAUSE)
async def test_kill_during_pause(crash_settings: Settings, bystander: dict[str, str], point: str) -> None:
    sid = new_sandbox_id()
    assert crash(crash_settings, point, sid, "create", "pause") == ["create"]
    committed = PAUSE.index(point) >= PAUSE.index("pause.committed")
    await check_after_restart(crash_settings, bystander, sid, {S.PAUSED} if committed else {S.RUNNING})


@pytest.mark.parametrize("point", RESUME)
async def test_kill_during_resume(crash_settings: Settings, bystander: dict[str, str], point: str) -> None:
    sid = new_sandbox_id()
    # The resume points are only reached by the resume: create and pause run through first.
    assert crash(crash_settings, point, sid, "create", "pause", "resume") == ["create", "pause"]
    await check_after_restart(crash_settings, bystander, sid, {S.PAUSED, S.RUNNING})


@pytest.mark.parametrize("point", SNAPSHOT)
@pytest.mark.parametrize("source", ["running", "paused"])
async def test_kill_during_snapshot(
    crash_settings: Settings, bystander: dict[str, str], point: str, source: str
) -> None:
    sid = new_sandbox_id()
    ops = ["create", "snapshot:crashed"] if source == "running" else ["create", "pause", "snapshot:crashed"]
    crash(crash_settings, point, sid, *ops)
    # The source comes back as it was: a running one running (as after a fork), a paused one paused.
    expected = S.RUNNING if source == "running" else S.PAUSED
    await check_after_restart(crash_settings, bystander, sid, {expected})
    assert not (crash_settings.templates_dir / "crashed").exists()


@pytest.mark.parametrize("point", SNAPSHOT)
async def test_kill_during_fork(crash_settings: Settings, bystander: dict[str, str], point: str) -> None:
    sid = new_sandbox_id()
    assert crash(crash_settings, point, sid, "create", "fork") == ["create"]
    await check_after_restart(crash_settings, bystander, sid, {S.RUNNING})
