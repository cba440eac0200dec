"""Start-up recovery against the fake runtime: each interrupted state ends where recovery.py says.
Real crashes (SIGKILL of a manager process with real VMs) are in tests/manager/test_crash_vm.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from wrenbox.manager import CreateRequest, ManagerConfig, SandboxManager
from wrenbox.manager.store import Store
from wrenbox.records import SandboxRecord, SandboxState, TemplateRecord, TemplateState

from .fakes import FakeRuntime

S = SandboxState
pytestmark = pytest.mark.anyio


def manager(store: Store, runtime: FakeRuntime, tmp_path: Path) -> SandboxManager:
    return SandboxManager(ManagerConfig(), store, runtime)


def interrupted(store: Store, runtime: FakeRuntime, sid: str, state: SandboxState, keys: list[str]) -> None:
    """What a crash in ``state`` leaves: a record in that state holding ``keys``, all live on the host."""
    resources = {k: f"{sid}:{k}" for k in keys}
    store.insert_sandbox(SandboxRecord(id=sid, template="minimal", state=state, resources=resources))
    runtime.held |= set(resources.values())


async def test_template_rows_follow_the_disk(store: Store, runtime: FakeRuntime, tmp_path: Path) -> None:
    store.insert_template(TemplateRecord(name="half", kind="snapshot", path="/x"))  # building: never listed
    store.insert_template(TemplateRecord(name="gone", kind="snapshot", path="/y", state=TemplateState.READY))
    await manager(store, runtime, tmp_path).recover()
    assert [(t.name, t.state) for t in store.list_templates()] == [("minimal", TemplateState.READY)]


@pytest.mark.parametrize(
    ("state", "keys", "setup", "expected", "kept"),
    [
        (S.CREATING, ["slot", "disk"], None, S.DESTROYED, []),
        (S.STOPPING, ["disk", "snapshot"], None, S.DESTROYED, []),
        (S.RUNNING, ["slot", "disk", "vm"], None, S.RUNNING, ["slot", "disk", "vm"]),
        (S.RUNNING, ["slot", "disk", "vm"], "stopped", S.RUNNING, ["slot", "disk", "vm"]),
        (S.RUNNING, ["slot", "disk"], None, S.ERROR, ["disk"]),  # VM gone, never paused
        (S.RUNNING, ["disk", "snapshot", "slot"], "revertible", S.PAUSED, ["disk", "snapshot"]),
        (S.PAUSING, ["slot", "disk", "vm", "snapshot"], "committed", S.PAUSED, ["disk", "snapshot"]),
        (S.PAUSING, ["slot", "disk", "vm"], "stopped", S.RUNNING, ["slot", "disk", "vm"]),
        (S.PAUSING, ["slot", "disk"], None, S.ERROR, ["disk"]),
        (S.PAUSING, ["disk", "snapshot", "slot"], "revertible", S.PAUSED, ["disk", "snapshot"]),
        (S.RESUMING, ["disk", "snapshot", "slot", "vm"], None, S.RUNNING, ["disk", "snapshot", "slot", "vm"]),
        (S.RESUMING, ["disk", "snapshot", "slot"], None, S.PAUSED, ["disk", "snapshot"]),
        (S.SNAPSHOTTING, ["disk", "snapshot"], None, S.PAUSED, ["disk", "snapshot"]),
        (S.SNAPSHOTTING, ["slot", "disk", "vm"], "stopped", S.RUNNING, ["slot", "disk", "vm"]),
    ],
)
async def test_each_interrupted_state_settles(
    store: Store,
    runtime: FakeRuntime,
    tmp_path: Path,
    state: SandboxState,
    keys: list[str],
    setup: str | None,
    expected: SandboxState,
    kept: list[str],
) -> None:
    interrupted(store, runtime, "crash001", state, keys)
    if setup == "stopped":
        runtime.stopped.add("crash001")
    if setup == "committed":
        runtime.committed.add("crash001")
    if setup == "revertible":
        runtime.revertible_ids.add("crash001")
    report = await manager(store, runtime, tmp_path).recover()
    rec = store.get_sandbox("crash001")
    assert rec.state is expected
    assert sorted(rec.resources) == sorted(kept)
    assert runtime.held == {f"crash001:{k}" for k in kept}
    assert "crash001" not in runtime.stopped
    assert report["sandboxes"]["crash001"] == f"{state.value} -> {expected.value}"


async def test_paused_sandboxes_are_untouched_and_resume(
    store: Store, runtime: FakeRuntime, tmp_path: Path
) -> None:
    first = manager(store, runtime, tmp_path)
    rec = await first.create(CreateRequest())
    await first.pause(rec.id)
    runtime.held.add("orphan:slot")  # something a crash left that no record names
    second = manager(store, runtime, tmp_path)
    report = await second.recover()
    assert report["swept"] == {"things": ["orphan:slot"]}
    assert second.get(rec.id).state is S.PAUSED
    assert (await second.resume(rec.id)).state is S.RUNNING


async def test_a_fork_template_no_sandbox_uses_is_deleted(
    store: Store, runtime: FakeRuntime, tmp_path: Path
) -> None:
    """A crash before a fork made its children (or while it made the first) leaves its template
    published and unused; one that made a child, and every other kind of template, stay."""
    ready = TemplateState.READY
    for name, kind in [("fork-a", "fork"), ("fork-b", "fork"), ("kept", "snapshot")]:
        store.insert_template(TemplateRecord(name=name, kind=kind, path=f"/{name}", state=ready))
        runtime.templates.add(name)
    interrupted(store, runtime, "child001", S.RUNNING, ["slot", "disk", "vm"])
    child = store.get_sandbox("child001")
    child.template = "fork-b"
    store.save_sandbox(child)
    interrupted(store, runtime, "child002", S.CREATING, ["slot"])  # fork-a's, cut short
    child = store.get_sandbox("child002")
    child.template = "fork-a"
    store.save_sandbox(child)
    await manager(store, runtime, tmp_path).recover()
    assert sorted(t.name for t in store.list_templates()) == ["fork-b", "kept", "minimal"]
    assert runtime.templates == {"fork-b", "kept"}
