"""The manager's policy (states, locks, rollback, limits, activity) against a fake runtime.
The same operations against real VMs are in tests/manager/test_lifecycle_vm.py."""

from __future__ import annotations

import ast
from pathlib import Path

import anyio
import pytest

from wrenbox import faults
from wrenbox.errors import (
    AlreadyExists,
    InUse,
    InvalidArgument,
    NotFound,
    NotRunning,
    Unavailable,
)
from wrenbox.manager import CreateRequest, ManagerConfig, SandboxManager, SandboxMetrics
from wrenbox.manager.store import Store
from wrenbox.records import SandboxState, TemplateState
from wrenbox.runtime import host as host_runtime

from .conftest import make_manager
from .fakes import FakeMetrics, FakeRuntime

S = SandboxState
pytestmark = pytest.mark.anyio


async def test_create_records_everything(mgr: SandboxManager, store: Store, runtime: FakeRuntime) -> None:
    rec = await mgr.create(CreateRequest(metadata={"user": "ann"}, env={"A": "1"}, timeout_s=30))
    assert rec.state is S.RUNNING
    assert rec.host_ip == "10.11.0.1"
    assert list(rec.resources) == ["slot", "disk", "vm"]
    stored = store.get_sandbox(rec.id)
    assert stored.state is S.RUNNING
    assert (stored.template, stored.vcpus, stored.memory_mb) == ("minimal", 1, 256)
    assert runtime.held == {f"{rec.id}:slot", f"{rec.id}:disk", f"{rec.id}:vm"}
    kinds = [e["kind"] for e in store.events(sandbox_id=rec.id)]
    assert kinds == ["creating", "running"]


CREATE_STEPS = ["create.slot", "create.disk", "create.vm", "create.init"]


def real_points() -> list[str]:
    """The fault points the host runtime marks, in source order (each method's order is its steps')."""
    calls = [
        node
        for node in ast.walk(ast.parse(Path(host_runtime.__file__).read_text()))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "faults.point"
    ]
    calls.sort(key=lambda node: (node.lineno, node.col_offset))
    return [node.args[0].value for node in calls if isinstance(node.args[0], ast.Constant)]


async def test_the_fakes_steps_are_the_real_runtimes(mgr: SandboxManager) -> None:
    """Each step the fake runtime fails at is one the host runtime has, in the host runtime's order, and
    the fake creates in all of the runtime's steps: a policy proved here against a failed step is proved
    against a step that exists."""
    real = real_points()
    with faults.recording() as seen:
        rec = await mgr.create(CreateRequest())
        await mgr.pause(rec.id)
        await mgr.resume(rec.id)
        await mgr.snapshot(rec.id, "from-fake")
    for op in ("create", "pause", "resume", "snapshot"):
        fake = [s for s in seen if s.startswith(f"{op}.")]
        ours = [s for s in real if s.startswith(f"{op}.")]
        assert fake, op
        assert [s for s in ours if s in fake] == fake, f"{op}: the fake's {fake}, the runtime's {ours}"
    assert [s for s in real if s.startswith("create.")] == CREATE_STEPS


@pytest.mark.parametrize("step", CREATE_STEPS)
async def test_failed_create_leaves_nothing(
    mgr: SandboxManager, store: Store, runtime: FakeRuntime, step: str
) -> None:
    with faults.armed(step), pytest.raises(faults.InjectedFault):
        await mgr.create(CreateRequest(sandbox_id="fail0001"))
    assert runtime.held == set()
    rec = store.get_sandbox("fail0001")
    assert rec.state is S.DESTROYED
    assert rec.resources == {}
    assert "InjectedFault" in (rec.error or "")
    assert mgr.list() == []


async def test_failed_release_during_rollback_is_an_error_with_leftovers(
    mgr: SandboxManager, runtime: FakeRuntime
) -> None:
    runtime.failing_release.add("disk")
    with faults.armed("create.init"), pytest.raises(faults.InjectedFault):
        await mgr.create(CreateRequest(sandbox_id="fail0002"))
    rec = mgr.get("fail0002")
    assert rec.state is S.ERROR
    assert rec.leftovers == ["disk"]
    assert list(rec.resources) == ["disk"]  # still recorded, so it can be reclaimed
    runtime.failing_release.clear()
    await mgr.destroy("fail0002")
    assert mgr.get("fail0002").state is S.DESTROYED
    assert runtime.held == set()


async def test_pause_resume_keeps_identity(mgr: SandboxManager, runtime: FakeRuntime) -> None:
    rec = await mgr.create(CreateRequest(metadata={"k": "v"}, env={"E": "1"}, timeout_s=7))
    paused = await mgr.pause(rec.id)
    assert paused.state is S.PAUSED
    assert paused.host_ip is None
    assert list(paused.resources) == ["disk", "snapshot"]
    assert f"{rec.id}:vm" not in runtime.held
    resumed = await mgr.resume(rec.id)
    assert resumed.state is S.RUNNING
    for field in ("template", "vcpus", "memory_mb", "metadata", "env", "created_at", "timeout_s"):
        assert getattr(resumed, field) == getattr(rec, field), field
    assert resumed.host_ip == "10.11.0.2"


async def test_failed_pause_keeps_it_running(mgr: SandboxManager, runtime: FakeRuntime) -> None:
    rec = await mgr.create(CreateRequest())
    with faults.armed("pause.memory"), pytest.raises(faults.InjectedFault):
        await mgr.pause(rec.id)
    got = mgr.get(rec.id)
    assert got.state is S.RUNNING
    assert "snapshot" not in got.resources
    assert f"{rec.id}:vm" in runtime.held


@pytest.mark.parametrize("step", ["resume.slot", "resume.vm", "resume.init"])
async def test_failed_resume_keeps_it_paused(mgr: SandboxManager, runtime: FakeRuntime, step: str) -> None:
    rec = await mgr.create(CreateRequest())
    await mgr.pause(rec.id)
    with faults.armed(step), pytest.raises(faults.InjectedFault):
        await mgr.resume(rec.id)
    got = mgr.get(rec.id)
    assert got.state is S.PAUSED
    assert list(got.resources) == ["disk", "snapshot"]
    assert runtime.held == {f"{rec.id}:disk", f"{rec.id}:snapshot"}
    assert (await mgr.resume(rec.id)).state is S.RUNNING


async def test_wrong_state_errors(mgr: SandboxManager) -> None:
    rec = await mgr.create(CreateRequest())
    await mgr.pause(rec.id)
    with pytest.raises(NotRunning):
        await mgr.pause(rec.id)
    with pytest.raises(NotRunning):
        await mgr.exec(rec.id, "true")
    with pytest.raises(NotRunning):
        mgr.ping(rec.id)
    with pytest.raises(NotFound):
        await mgr.pause("nosuch0000")


async def test_pause_cancels_in_flight_requests_instead_of_hanging(
    mgr: SandboxManager, runtime: FakeRuntime
) -> None:
    rec = await mgr.create(CreateRequest())
    outcome: list[BaseException] = []

    async def long_exec() -> None:
        try:
            await mgr.exec(rec.id, "block")
        except NotRunning as exc:
            outcome.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(long_exec)
            await runtime.envd_client.blocked.wait()
            await mgr.pause(rec.id)
    assert len(outcome) == 1
    assert "paused or stopped" in str(outcome[0])


async def test_destroy_is_idempotent_and_releases_everything(
    mgr: SandboxManager, runtime: FakeRuntime
) -> None:
    rec = await mgr.create(CreateRequest())
    await mgr.pause(rec.id)
    await mgr.destroy(rec.id)
    await mgr.destroy(rec.id)
    assert runtime.held == set()
    assert mgr.get(rec.id).state is S.DESTROYED
    assert mgr.list() == []
    assert [r.id for r in mgr.list(states={S.DESTROYED})] == [rec.id]
    with pytest.raises(NotFound):
        await mgr.destroy("nosuch0000")


async def test_sandbox_limit(store: Store, runtime: FakeRuntime, tmp_path: Path) -> None:
    mgr = make_manager(store, runtime, max_sandboxes=2)
    a = await mgr.create(CreateRequest())
    await mgr.create(CreateRequest())
    with pytest.raises(Unavailable, match="limit"):
        await mgr.create(CreateRequest())
    await mgr.pause(a.id)  # paused sandboxes hold no VM
    c = await mgr.create(CreateRequest())
    with pytest.raises(Unavailable):
        await mgr.resume(a.id)
    await mgr.destroy(c.id)
    assert (await mgr.resume(a.id)).state is S.RUNNING


async def test_concurrent_start_limit(store: Store, runtime: FakeRuntime, tmp_path: Path) -> None:
    mgr = make_manager(store, runtime, max_concurrent_starts=1)
    gate = anyio.Event()
    real_start = runtime.start

    async def slow_start(*args: object, **kwargs: object) -> str:
        await gate.wait()
        return await real_start(*args, **kwargs)  # type: ignore[arg-type]

    runtime.start = slow_start  # type: ignore[method-assign]
    errors: list[Exception] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(mgr.create, CreateRequest())
        await anyio.sleep(0.05)
        try:
            await mgr.create(CreateRequest())
        except Unavailable as exc:
            errors.append(exc)
        gate.set()
    assert len(errors) == 1
    assert "starting already" in str(errors[0])
    assert len(mgr.list()) == 1


@pytest.mark.parametrize(
    "req",
    [
        CreateRequest(template="../etc"),
        CreateRequest(timeout_s=-1),
        CreateRequest(metadata={"k": 1}),  # type: ignore[dict-item]
        CreateRequest(env={"": "x"}),
        CreateRequest(on_timeout="explode"),  # type: ignore[arg-type]
    ],
)
async def test_bad_create_input_changes_nothing(
    mgr: SandboxManager, store: Store, runtime: FakeRuntime, req: CreateRequest
) -> None:
    with pytest.raises(InvalidArgument):
        await mgr.create(req)
    assert store.list_sandboxes() == []
    assert runtime.held == set()


async def test_unknown_template(mgr: SandboxManager) -> None:
    with pytest.raises(NotFound, match="template nosuch"):
        await mgr.create(CreateRequest(template="nosuch"))


async def test_snapshot_makes_a_template_and_leaves_the_sandbox_running(
    mgr: SandboxManager, runtime: FakeRuntime
) -> None:
    rec = await mgr.create(CreateRequest())
    tpl = await mgr.snapshot(rec.id, "mine")
    assert tpl.state is TemplateState.READY
    assert tpl.parent == "minimal"
    assert tpl.size_bytes == 1234
    assert mgr.get(rec.id).state is S.RUNNING
    child = await mgr.create(CreateRequest(template="mine"))
    assert child.template == "mine"
    with pytest.raises(AlreadyExists):
        await mgr.snapshot(rec.id, "mine")
    with pytest.raises(InvalidArgument):
        await mgr.snapshot(rec.id, "bad/name")
    with pytest.raises(InUse, match=f"sandbox {child.id}"):
        await mgr.delete_template("mine")
    await mgr.destroy(child.id)
    await mgr.delete_template("mine")
    assert "mine" not in runtime.templates


async def test_failed_snapshot_lists_no_template(mgr: SandboxManager, store: Store) -> None:
    rec = await mgr.create(CreateRequest())
    with faults.armed("snapshot.write"), pytest.raises(faults.InjectedFault):
        await mgr.snapshot(rec.id, "half")
    with pytest.raises(NotFound):
        store.get_template("half")
    assert mgr.get(rec.id).state is S.RUNNING  # as it was


async def test_fork_keeps_the_source_running_and_cleans_up_its_template(
    mgr: SandboxManager, store: Store, runtime: FakeRuntime
) -> None:
    src = await mgr.create(CreateRequest(metadata={"m": "1"}))
    kids = await mgr.fork(src.id, count=2)
    assert mgr.get(src.id).state is S.RUNNING
    assert len({k.id for k in kids}) == 2
    assert all(k.template.startswith(f"fork-{src.id}-") and k.metadata == {"m": "1"} for k in kids)
    fork_tpl = kids[0].template
    for k in kids:
        await mgr.destroy(k.id)
    with pytest.raises(NotFound):
        store.get_template(fork_tpl)
    assert fork_tpl not in runtime.templates


async def test_fork_is_all_or_nothing(mgr: SandboxManager, store: Store, runtime: FakeRuntime) -> None:
    src = await mgr.create(CreateRequest())
    real_start = runtime.start
    calls = 0

    async def third_fails(*args: object, **kwargs: object) -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("no memory")
        return await real_start(*args, **kwargs)  # type: ignore[arg-type]

    runtime.start = third_fails  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await mgr.fork(src.id, count=3)
    assert [r.id for r in mgr.list()] == [src.id]
    assert [t.name for t in store.list_templates()] == ["minimal"]


async def test_expire_acts_only_at_the_end(store: Store, runtime: FakeRuntime) -> None:
    now = [1000.0]
    mgr = SandboxManager(ManagerConfig(), store, runtime, clock=lambda: now[0])
    rec = await mgr.create(CreateRequest(timeout_s=3))
    assert mgr.get(rec.id).end_at == 1003.0
    now[0] += 2
    await mgr.exec(rec.id, "true")  # use does not extend a lifetime (E2B's rule)
    await mgr.expire(rec.id, "pause")  # before the end: nothing happens
    assert mgr.get(rec.id).state is S.RUNNING
    mgr.set_timeout(rec.id, 2)  # now 1002 + 2
    now[0] += 1.5
    await mgr.expire(rec.id, "pause")
    assert mgr.get(rec.id).state is S.RUNNING
    now[0] += 0.5
    await mgr.expire(rec.id, "pause")
    assert mgr.get(rec.id).state is S.PAUSED
    assert mgr.get(rec.id).end_at == 1004.0  # kept while paused (E2B reports it too)
    await mgr.resume(rec.id)
    assert mgr.get(rec.id).end_at == now[0] + 3  # its timeout again, from the resume
    other = await mgr.create(CreateRequest(timeout_s=1, on_timeout="kill"))
    now[0] += 5
    await mgr.expire(other.id, "kill")
    assert mgr.get(other.id).state is S.DESTROYED


async def test_failed_auto_pause_counts_and_keeps_the_sandbox(mgr: SandboxManager, store: Store) -> None:
    rec = await mgr.create(CreateRequest(timeout_s=1))
    mgr.set_timeout(rec.id, 0)  # its end is now
    with faults.armed("pause.stop"), pytest.raises(faults.InjectedFault):
        await mgr.expire(rec.id, "pause")
    got = mgr.get(rec.id)
    assert got.state is S.RUNNING
    assert got.pause_failures == 1


async def test_shutdown_pauses_running_sandboxes(mgr: SandboxManager) -> None:
    a = await mgr.create(CreateRequest())
    b = await mgr.create(CreateRequest())
    await mgr.pause(b.id)
    await mgr.shutdown()
    assert {r.id: r.state for r in mgr.list()} == {a.id: S.PAUSED, b.id: S.PAUSED}


async def test_list_filters(mgr: SandboxManager) -> None:
    a = await mgr.create(CreateRequest(metadata={"team": "x"}))
    b = await mgr.create(CreateRequest(metadata={"team": "y"}))
    await mgr.pause(b.id)
    assert [r.id for r in mgr.list(metadata={"team": "x"})] == [a.id]
    assert [r.id for r in mgr.list(states={S.PAUSED})] == [b.id]


async def test_exec_passes_the_output_cap(mgr: SandboxManager) -> None:
    rec = await mgr.create(CreateRequest())
    result = await mgr.exec(rec.id, "echo")
    assert result["output_cap"] == mgr.config.exec_output_cap_bytes


async def test_state_survives_a_new_manager(store: Store, runtime: FakeRuntime, tmp_path: Path) -> None:
    mgr = make_manager(store, runtime)
    rec = await mgr.create(CreateRequest(metadata={"k": "v"}))
    await mgr.pause(rec.id)
    again = make_manager(store, runtime)
    got = again.get(rec.id)
    assert got.state is S.PAUSED
    assert got.metadata == {"k": "v"}
    assert (await again.resume(rec.id)).state is S.RUNNING


async def test_exec_stream_and_metrics(mgr: SandboxManager) -> None:
    rec = await mgr.create(CreateRequest())
    events = [e async for e in mgr.exec_stream(rec.id, "ls")]
    assert events == ["started", "stdout:ls", "exited:0"]
    m = await mgr.metrics(rec.id)
    assert (m.state, m.host, m.guest) == (S.RUNNING, {"resources": 3}, FakeMetrics())
    await mgr.pause(rec.id)
    paused = {"resources": 2, "disk_bytes": 100, "snapshot_bytes": 1000}
    assert await mgr.metrics(rec.id) == SandboxMetrics(S.PAUSED, paused)
    await mgr.destroy(rec.id)
    with pytest.raises(NotFound):
        await mgr.metrics(rec.id)
