"""Fault injection on real VMs: a failure at every step of create, resume and pause gives back exactly
what the step had taken. The steps are enumerated by recording a successful run, so the lists follow
the code (``wrenbox.faults``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

from wrenbox import faults
from wrenbox.config import Settings
from wrenbox.errors import Unavailable
from wrenbox.faults import InjectedFault
from wrenbox.manager import CreateRequest, SandboxManager
from wrenbox.names import new_sandbox_id
from wrenbox.records import SandboxState
from wrenbox.service import Host

from .conftest import leftovers, policy
from .guest import Contents, process_tags, run, start_counter, tree

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.root]
S = SandboxState
# What a pause must have written before it counts as done: a failure up to here keeps the VM running.
PAUSE_WRITES = {"pause.stop", "pause.vmstate", "pause.memory"}


async def steps_of(op: str, action: Callable[[], Awaitable[Any]]) -> list[str]:
    """The fault points of ``op`` that ``action`` passes, in order."""
    with faults.recording() as seen:
        await action()
    found = [name for name in dict.fromkeys(seen) if name.startswith(f"{op}.")]
    assert found, f"no {op}.* fault points were passed"
    return found


def injected(step: str) -> Any:
    return pytest.raises(InjectedFault, match=f"at {step}$")


async def test_a_failed_create_step_leaves_nothing(
    host: Host, manager: SandboxManager, settings: Settings
) -> None:
    steps = await steps_of("create", lambda: manager.create(CreateRequest(sandbox_id=new_sandbox_id())))
    assert len(steps) >= 4  # slot, disk, VM, agent /init at least
    for rec in manager.list():
        await manager.destroy(rec.id)
    rt = host.runtime
    assert leftovers(settings) == {}

    for step in steps:
        sandbox_id = new_sandbox_id()
        with faults.armed(step), injected(step):
            await manager.create(CreateRequest(sandbox_id=sandbox_id))
        rec = manager.get(sandbox_id)
        assert (rec.state, rec.resources, rec.leftovers) == (S.DESTROYED, {}, []), step
        assert step in (rec.error or "")
        assert leftovers(settings) == {}, f"a failure at {step} left things behind"
        assert rt.network.in_use() == frozenset(), step
        assert sandbox_id not in rt._vms, step
        assert sandbox_id not in rt._clients, step

    # Nothing is stuck: the next create works.
    sb = await manager.create(CreateRequest())
    assert await run(manager, sb.id, "echo ok") == "ok\n"


async def test_a_failed_resume_step_leaves_it_paused_and_resumable(
    host: Host, manager: SandboxManager, settings: Settings
) -> None:
    sb = await manager.create(CreateRequest(env={"KEPT": "yes"}))
    contents = Contents.random(1 << 20)
    await contents.write(manager, sb.id)
    await start_counter(manager, sb.id)
    await manager.pause(sb.id)
    steps = await steps_of("resume", lambda: manager.resume(sb.id))
    assert len(steps) >= 4  # disk, slot, memory, VM, agent at least
    await manager.pause(sb.id)
    rt = host.runtime
    paused = manager.get(sb.id)
    held = leftovers(settings)
    snapshot = tree(host.runtime.files.snapshot_dir(sb.id))

    for step in steps:
        with faults.armed(step), injected(step):
            await manager.resume(sb.id)
        rec = manager.get(sb.id)
        assert rec.state is S.PAUSED, step
        assert (rec.resources, rec.leftovers, rec.host_ip) == (paused.resources, [], None), step
        assert step in (rec.error or "")
        assert leftovers(settings) == held, f"a failure at {step} left things behind"
        assert rt.network.in_use() == frozenset(), step
        assert tree(rt.files.snapshot_dir(sb.id)) == snapshot, f"a failure at {step} changed the snapshot"

    await manager.resume(sb.id)
    assert await contents.check(manager, sb.id) == []
    assert "counter" in await process_tags(manager, sb.id)
    assert await run(manager, sb.id, "echo $KEPT") == "yes\n"


async def test_a_failed_pause_step_keeps_it_running(
    host: Host, manager: SandboxManager, settings: Settings
) -> None:
    sb = await manager.create(CreateRequest())
    contents = Contents.random(1 << 20)
    await contents.write(manager, sb.id)

    async def pause_and_resume() -> None:
        await manager.pause(sb.id)
        await manager.resume(sb.id)

    steps = await steps_of("pause", pause_and_resume)
    # A failure after the snapshot is committed is a crash test's business (wrenbox.manager.recovery).
    steps = steps[: steps.index("pause.committed")]
    assert set(steps) >= PAUSE_WRITES

    async def fail_each_step(previous: dict[str, tuple[int, str]] | None) -> None:
        running = manager.get(sb.id)
        held = leftovers(settings)
        for step in steps:
            with faults.armed(step), injected(step):
                await manager.pause(sb.id)
            rec = manager.get(sb.id)
            assert (rec.state, rec.host_ip, rec.leftovers) == (S.RUNNING, running.host_ip, []), step
            assert set(rec.resources) == set(running.resources), step
            assert await contents.check(manager, sb.id) == [], f"after a failure at {step}"
            assert leftovers(settings) == held, f"a failure at {step} left things behind"
            directory = host.runtime.files.snapshot_dir(sb.id)
            assert not [p.name for p in directory.parent.glob(".*tmp*")], step
            if previous is None:
                assert not directory.exists(), f"a failure at {step} of a first pause left a snapshot"
            else:
                assert tree(directory) == previous, f"a failure at {step} changed the last good snapshot"

    await manager.destroy(sb.id)
    sb = await manager.create(CreateRequest())
    await contents.write(manager, sb.id)
    await fail_each_step(None)  # a first pause: there is no snapshot yet
    await pause_and_resume()
    await fail_each_step(tree(host.runtime.files.snapshot_dir(sb.id)))  # a later pause: the last one stays

    # And the last good snapshot still serves a resume, after a pause that works.
    await manager.pause(sb.id)
    await manager.resume(sb.id)
    assert await contents.check(manager, sb.id) == []


async def test_a_failed_snapshot_or_fork_leaves_no_template(
    host: Host, manager: SandboxManager, settings: Settings
) -> None:
    sb = await manager.create(CreateRequest())
    contents = Contents.random(1 << 20)
    await contents.write(manager, sb.id)
    templates = {t.name for t in manager.templates()}
    on_disk = sorted(p.name for p in settings.templates_dir.iterdir())

    def unchanged() -> None:
        assert {t.name for t in manager.templates()} == templates
        assert sorted(p.name for p in settings.templates_dir.iterdir()) == on_disk

    # A fork that fails while writing its template: the source keeps running.
    with faults.armed("snapshot.write"), injected("snapshot.write"):
        await manager.fork(sb.id, 2)
    unchanged()
    assert manager.get(sb.id).state is S.RUNNING
    assert await contents.check(manager, sb.id) == []

    # A fork that cannot make every child makes none (all or nothing): the second child fails, or is
    # refused by the sandbox limit.
    def only_the_source_is_left() -> None:
        unchanged()
        assert [r.id for r in manager.list()] == [sb.id]
        assert manager.get(sb.id).state is S.RUNNING

    with faults.armed("create.init"), injected("create.init"):
        await manager.fork(sb.id, 2)
    only_the_source_is_left()
    with pytest.raises(Unavailable):
        await policy(host, max_sandboxes=2).fork(sb.id, 2)
    only_the_source_is_left()
    assert await contents.check(manager, sb.id) == []

    # A snapshot that fails while writing: the sandbox goes on running, intact.
    with faults.armed("snapshot.write"), injected("snapshot.write"):
        await manager.snapshot(sb.id, "never-published")
    unchanged()
    assert manager.get(sb.id).state is S.RUNNING
    assert await contents.check(manager, sb.id) == []


@dataclass
class Cancel:
    """Where a cancellation was sent, and what the operation passed afterwards."""

    scope: anyio.CancelScope
    after: list[str] = field(default_factory=list)  # fault points passed after the cancel

    @property
    def landed(self) -> bool:
        """The operation raised Cancelled out of the scope (rather than running to completion)."""
        return self.scope.cancelled_caught


@contextmanager
def cancelled_at(step: str) -> Iterator[Cancel]:
    """A cancel scope that is cancelled when the code inside passes fault point ``step`` (as when a
    client gives up or a deadline passes right there); the cancellation lands at the next await."""
    cancel = Cancel(anyio.CancelScope())
    real = faults.point

    def point(name: str) -> None:
        if cancel.scope.cancel_called:
            cancel.after.append(name)
        real(name)
        if name == step:
            cancel.scope.cancel()

    faults.point = point  # type: ignore[assignment]
    try:
        with cancel.scope:
            yield cancel
    finally:
        faults.point = real  # type: ignore[assignment]


def settled(op: str, steps: list[str], step: str, cancel: Cancel, failed: S, done: S, state: S) -> None:
    """A cancel at any step but the last lands at the step's next await, before the operation's next
    step, and leaves ``failed``; at the last step every await is behind it (or shielded), so the
    operation completes: ``done``."""
    last = step == steps[-1]
    where = f"{op} cancelled at {step}"
    assert cancel.landed is not last, f"{where}: cancelled_caught={cancel.landed}"
    assert [p for p in cancel.after if p.startswith(f"{op}.")] == [], f"{where} went on: {cancel.after}"
    assert state is (done if last else failed), f"{where} left it {state.value}"


async def test_a_cancelled_operation_ends_in_a_settled_state(
    host: Host, manager: SandboxManager, settings: Settings
) -> None:
    """Cancellation is not an error to wait out: it lands at once, and the sandbox settles as after a
    failure at that step."""
    create_steps = await steps_of("create", lambda: manager.create(CreateRequest()))
    for rec in manager.list():
        await manager.destroy(rec.id)
    for step in create_steps:
        sandbox_id = new_sandbox_id()
        with cancelled_at(step) as cancel:
            await manager.create(CreateRequest(sandbox_id=sandbox_id))
        settled("create", create_steps, step, cancel, S.DESTROYED, S.RUNNING, manager.get(sandbox_id).state)
        if manager.get(sandbox_id).state is S.RUNNING:
            await manager.destroy(sandbox_id)
        assert leftovers(settings) == {}, f"a create cancelled at {step} left things behind"

    sb = await manager.create(CreateRequest())
    contents = Contents.random(1 << 20)
    await contents.write(manager, sb.id)
    await manager.pause(sb.id)
    resume_steps = await steps_of("resume", lambda: manager.resume(sb.id))
    pause_steps = await steps_of("pause", lambda: manager.pause(sb.id))
    for step in resume_steps:
        with cancelled_at(step) as cancel:
            await manager.resume(sb.id)
        settled("resume", resume_steps, step, cancel, S.PAUSED, S.RUNNING, manager.get(sb.id).state)
        if manager.get(sb.id).state is S.PAUSED:
            await manager.resume(sb.id)
        assert await contents.check(manager, sb.id) == [], step
        await manager.pause(sb.id)
    await manager.resume(sb.id)
    for step in pause_steps:
        with cancelled_at(step) as cancel:
            await manager.pause(sb.id)
        settled("pause", pause_steps, step, cancel, S.RUNNING, S.PAUSED, manager.get(sb.id).state)
        if manager.get(sb.id).state is S.PAUSED:
            await manager.resume(sb.id)
        assert await contents.check(manager, sb.id) == [], step

    # A destroy cancelled as it starts releasing still completes: half a destroy helps nobody.
    rt = host.runtime
    scope = anyio.CancelScope()
    real_release = rt.release

    async def release(rec: Any, key: str, value: Any) -> None:
        scope.cancel()
        await real_release(rec, key, value)

    rt.release = release  # type: ignore[method-assign]
    try:
        with scope:
            await manager.destroy(sb.id)
    finally:
        del rt.release
    assert manager.get(sb.id).state is S.DESTROYED
    assert leftovers(settings) == {}


async def test_a_vm_whose_agent_never_answers_is_ended_with_everything_else(
    host: Host, manager: SandboxManager, settings: Settings
) -> None:
    """A launch that fails after the VMM started (here: its agent never answers) ends the VM itself;
    the runtime gives back the rest, the agent client included, for a create and for a resume."""
    rt = host.runtime
    sandbox_id = new_sandbox_id()
    with faults.armed("launch.agent"), injected("launch.agent"):
        await manager.create(CreateRequest(sandbox_id=sandbox_id))
    assert manager.get(sandbox_id).state is S.DESTROYED
    assert (sandbox_id not in rt._clients, sandbox_id not in rt._vms) == (True, True)
    assert leftovers(settings) == {}

    sb = await manager.create(CreateRequest())
    await manager.pause(sb.id)
    held = leftovers(settings)
    with faults.armed("launch.agent"), injected("launch.agent"):
        await manager.resume(sb.id)
    assert manager.get(sb.id).state is S.PAUSED
    assert (sb.id not in rt._clients, sb.id not in rt._vms) == (True, True)
    assert rt.network.in_use() == frozenset()
    assert leftovers(settings) == held
    await manager.resume(sb.id)
    assert await run(manager, sb.id, "echo ok") == "ok\n"
