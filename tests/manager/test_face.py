"""The manager's face beyond the lifecycle (against the fake runtime): routes for a proxy, pauses with
or without memory, templates through their one road, the event log."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from wrenbox import faults
from wrenbox.errors import AlreadyExists, InUse, InvalidArgument, NotFound, NotRunning
from wrenbox.manager import Address, CreateRequest, Egress, ManagerConfig, SandboxManager
from wrenbox.manager.store import Store
from wrenbox.records import SandboxState, TemplateRecord, TemplateState

from .conftest import make_manager
from .fakes import FakeRuntime

S = SandboxState
pytestmark = pytest.mark.anyio


# -- route -----------------------------------------------------------------------------------------


async def test_route_gives_the_address_counts_as_use_and_ends_with_the_sandbox(
    store: Store, runtime: FakeRuntime
) -> None:
    now = [1000.0]
    mgr = SandboxManager(ManagerConfig(), store, runtime, clock=lambda: now[0])
    rec = await mgr.create(CreateRequest(timeout_s=10))
    assert mgr.get(rec.id).end_at == 1010.0
    with pytest.raises(NotRunning):
        async with mgr.route(rec.id, 8080) as address:
            assert address == Address(rec.host_ip, 8080, 1000.0)  # it has run since it was made
            now[0] += 5
            assert mgr.get(rec.id).last_active_at == now[0]  # in use while the stream is open
            await mgr.expire(rec.id, "pause")  # before its end: nothing happens
            assert mgr.get(rec.id).state is S.RUNNING
            now[0] += 5
            # At its end it is paused even with a stream open (E2B's lifetimes: use does not extend
            # them), and the stream is cut.
            await mgr.expire(rec.id, "pause")
            assert mgr.get(rec.id).state is S.PAUSED
            await anyio.lowlevel.checkpoint()
    with pytest.raises(NotRunning):
        async with mgr.route(rec.id, 8080):
            pass


async def test_route_is_cut_when_the_sandbox_pauses(mgr: SandboxManager) -> None:
    rec = await mgr.create(CreateRequest())
    streaming = anyio.Event()
    outcome: list[BaseException] = []

    async def proxy() -> None:
        try:
            async with mgr.route(rec.id, 49983):
                streaming.set()
                await anyio.sleep_forever()
        except NotRunning as exc:
            outcome.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(proxy)
            await streaming.wait()
            await mgr.pause(rec.id)
    assert len(outcome) == 1
    assert "paused or stopped" in str(outcome[0])


@pytest.mark.parametrize("port", [0, 65536, -1, True, "80"])
async def test_route_refuses_bad_ports(mgr: SandboxManager, port: object) -> None:
    rec = await mgr.create(CreateRequest())
    with pytest.raises(InvalidArgument, match="port"):
        async with mgr.route(rec.id, port):  # type: ignore[arg-type]
            pass


async def test_route_needs_a_running_sandbox(mgr: SandboxManager) -> None:
    rec = await mgr.create(CreateRequest())
    await mgr.pause(rec.id)
    with pytest.raises(NotRunning):
        async with mgr.route(rec.id, 80):
            pass
    await mgr.destroy(rec.id)
    with pytest.raises(NotFound):
        async with mgr.route(rec.id, 80):
            pass
    with pytest.raises(NotFound):
        async with mgr.route("nosuch0000", 80):
            pass


# -- pause with or without memory --------------------------------------------------------------------


async def test_pause_and_resume_say_whether_memory_is_kept(mgr: SandboxManager, runtime: FakeRuntime) -> None:
    rec = await mgr.create(CreateRequest())
    await mgr.pause(rec.id, memory=False)
    await mgr.resume(rec.id)
    await mgr.pause(rec.id)
    await mgr.resume(rec.id, memory=False)
    assert runtime.pauses == [(rec.id, False), (rec.id, True)]
    assert runtime.resumes == [(rec.id, True), (rec.id, False)]
    await mgr.pause(rec.id)
    assert (await mgr.connect(rec.id)).state is S.RUNNING
    assert runtime.resumes[-1] == (rec.id, True)


# -- templates -----------------------------------------------------------------------------------------


async def test_build_template_takes_the_one_road(
    mgr: SandboxManager, store: Store, runtime: FakeRuntime
) -> None:
    steps: list[str] = []
    built = await mgr.build_template("python", image="minimal", vcpus=2, memory_mb=1024, on_step=steps.append)
    assert (built.name, built.kind, built.state, built.source) == (
        "python",
        "base",
        TemplateState.READY,
        "minimal",
    )
    assert (built.vcpus, built.memory_mb, built.size_bytes) == (1, 256, 4321)  # what the files say
    assert steps == ["boot", "snapshot"]
    assert mgr.template("python") == built
    assert [t.name for t in mgr.templates()] == ["minimal", "python"]
    assert [e["detail"]["template"] for e in mgr.events() if e["kind"] == "template_created"] == ["python"]
    sandbox = await mgr.create(CreateRequest(template="python"))
    assert sandbox.template == "python"
    with pytest.raises(AlreadyExists):
        await mgr.build_template("python")
    with pytest.raises(InUse):
        await mgr.delete_template("python")
    await mgr.destroy(sandbox.id)
    await mgr.delete_template("python")
    assert "python" not in runtime.templates
    with pytest.raises(NotFound):
        mgr.template("python")
    assert [e["kind"] for e in mgr.events()][-1] == "template_deleted"


async def test_a_failed_build_leaves_no_row(mgr: SandboxManager, runtime: FakeRuntime) -> None:
    with faults.armed("build.snapshot"), pytest.raises(faults.InjectedFault):
        await mgr.build_template("broken")
    assert [t.name for t in mgr.templates()] == ["minimal"]
    with pytest.raises(NotFound):
        await mgr.create(CreateRequest(template="broken"))


async def test_a_template_being_built_is_neither_usable_nor_deletable_nor_built_twice(
    mgr: SandboxManager, runtime: FakeRuntime
) -> None:
    gate = anyio.Event()
    started = anyio.Event()
    real = runtime.build_template

    async def slow(*args: object, **kwargs: object) -> TemplateRecord:
        started.set()
        await gate.wait()
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    runtime.build_template = slow  # type: ignore[method-assign]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: mgr.build_template("slow"))
            await started.wait()
            assert mgr.template("slow").state is TemplateState.BUILDING
            with pytest.raises(NotFound, match="building"):
                await mgr.create(CreateRequest(template="slow"))
            with pytest.raises(AlreadyExists):
                await mgr.snapshot((await mgr.create(CreateRequest())).id, "slow")
            gate.set()
    assert mgr.template("slow").state is TemplateState.READY


@pytest.mark.parametrize("name", ["../etc", "", "a/b", "x" * 300])
async def test_bad_template_names_change_nothing(mgr: SandboxManager, name: str) -> None:
    with pytest.raises(InvalidArgument):
        await mgr.build_template(name)
    with pytest.raises(InvalidArgument):
        await mgr.delete_template(name)
    with pytest.raises(InvalidArgument):
        mgr.template(name)
    assert [t.name for t in mgr.templates()] == ["minimal"]


async def test_snapshot_without_a_name_gets_one(mgr: SandboxManager) -> None:
    rec = await mgr.create(CreateRequest())
    template = await mgr.snapshot(rec.id)
    assert template.name.startswith(f"snapshot-{rec.id}-")
    assert (template.source, template.parent, template.kind) == (rec.id, "minimal", "snapshot")
    with pytest.raises(NotFound):
        await mgr.snapshot("nosuch0000")


# -- recovery of template rows ----------------------------------------------------------------------------


async def test_recovery_finishes_interrupted_template_work(store: Store, runtime: FakeRuntime) -> None:
    runtime.templates |= {"published", "unlisted", "deleting"}
    store.insert_template(TemplateRecord(name="published", kind="base", path="", source="minimal"))
    store.insert_template(TemplateRecord(name="unpublished", kind="base", path="", source="minimal"))
    store.insert_template(
        TemplateRecord(name="deleting", kind="snapshot", path="/t/deleting", state=TemplateState.DELETING)
    )
    await make_manager(store, runtime).recover()
    rows = {t.name: t for t in store.list_templates()}
    assert sorted(rows) == ["minimal", "published", "unlisted"]
    assert rows["published"].state is TemplateState.READY  # built before the crash: finished
    assert rows["published"].path == "/t/published"
    assert rows["unlisted"].state is TemplateState.READY  # files without a row: registered
    assert "deleting" not in runtime.templates  # the interrupted deletion was finished
    kinds = {(e["kind"], e["detail"].get("template")) for e in store.events()}
    assert {("template_created", "published"), ("template_registered", "unlisted")} <= kinds
    assert ("template_deleted", "deleting") in kinds


# -- events --------------------------------------------------------------------------------------------


async def test_events_page_through_the_log(mgr: SandboxManager) -> None:
    rec = await mgr.create(CreateRequest())
    await mgr.pause(rec.id)
    mine = mgr.events(sandbox_id=rec.id)
    assert [e["kind"] for e in mine] == ["creating", "running", "pausing", "paused"]
    assert [e["kind"] for e in mgr.events(sandbox_id=rec.id, after=mine[1]["seq"], limit=1)] == ["pausing"]
    with pytest.raises(InvalidArgument):
        mgr.events(limit=0)


# -- egress ----------------------------------------------------------------------------------------


async def test_egress_rules_are_kept_applied_and_validated(mgr: SandboxManager, runtime: FakeRuntime) -> None:
    rec = await mgr.create(CreateRequest(egress=Egress(deny=("0.0.0.0/0",))))
    assert mgr.get(rec.id).egress == {"allow": [], "deny": ["0.0.0.0/0"]}
    changed = await mgr.set_egress(rec.id, Egress(allow=("198.51.100.7",), deny=("0.0.0.0/0",)))
    assert runtime.egress[rec.id] == changed.egress == {"allow": ["198.51.100.7"], "deny": ["0.0.0.0/0"]}
    await mgr.pause(rec.id)
    await mgr.set_egress(rec.id, Egress())  # kept for the resume
    assert mgr.get(rec.id).egress == {"allow": [], "deny": []}
    runtime.failing_egress = True
    await mgr.resume(rec.id)
    with pytest.raises(RuntimeError):
        await mgr.set_egress(rec.id, Egress(deny=("10.0.0.0/8",)))
    assert mgr.get(rec.id).egress == {"allow": [], "deny": []}  # a failed change changes nothing
    # Exactly what the firewall loads: host bits set (10.0.0.1/8) too is refused here, not at the slot.
    for bad in (("example.com",), ("300.1.1.1",), ("::1",), "1.2.3.4", ("10.0.0.1/8",)):
        with pytest.raises(InvalidArgument):
            Egress(allow=bad)  # type: ignore[arg-type]
    (child,) = await mgr.fork(rec.id)
    assert child.egress == mgr.get(rec.id).egress
