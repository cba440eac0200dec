"""What happens to a sandbox on its own while the manager runs, against the fake runtime: its VM exits
(settled by recovery's rule for a lost VM, calls in flight cut), a pause or the reaper meeting a VM that
already exited, a guest agent that restarted, a host table put back. The real thing, with QEMU killed and
agents respawned in real guests, is tests/sandbox/test_loss.py."""

from __future__ import annotations

import anyio
import pytest

from wrenbox.errors import NotRunning, Unavailable
from wrenbox.manager import CreateRequest, ManagerConfig, SandboxManager
from wrenbox.manager.reaper import Reaper
from wrenbox.manager.store import Store
from wrenbox.records import SandboxState

from .fakes import FakeRuntime

S = SandboxState
pytestmark = pytest.mark.anyio


async def settle(mgr: SandboxManager, sandbox_id: str, state: SandboxState) -> None:
    with anyio.fail_after(5):
        while True:
            if mgr.get(sandbox_id).state is state:
                return
            await anyio.sleep(0.01)


@pytest.mark.parametrize(
    ("revertible", "expected", "kept"), [(True, S.PAUSED, {"disk", "snapshot"}), (False, S.ERROR, {"disk"})]
)
async def test_an_exited_vm_is_settled_as_recovery_settles_a_lost_one(
    mgr: SandboxManager, runtime: FakeRuntime, revertible: bool, expected: SandboxState, kept: set[str]
) -> None:
    sb = await mgr.create(CreateRequest())
    if revertible:
        await mgr.pause(sb.id)
        await mgr.resume(sb.id)
        runtime.revertible_ids.add(sb.id)
    cut: list[BaseException] = []

    async def in_flight() -> None:
        try:
            await mgr.exec(sb.id, "block")
        except NotRunning as exc:
            cut.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(mgr.watch_vms)
        tg.start_soon(in_flight)
        await runtime.envd_client.blocked.wait()
        runtime.kill_vm(sb.id)
        await settle(mgr, sb.id, expected)
        tg.cancel_scope.cancel()
    rec = mgr.get(sb.id)
    assert set(rec.resources) == kept
    assert not {h for h in runtime.held if h.startswith(sb.id)} - {f"{sb.id}:{k}" for k in kept}
    assert rec.error is not None
    assert "lost while it ran" in rec.error
    assert ("last pause" in rec.error) is revertible
    assert [str(e) for e in cut] == [f"sandbox {sb.id} lost its VM while the request ran"]


async def test_an_exit_reported_for_a_vm_already_replaced_changes_nothing(
    mgr: SandboxManager, runtime: FakeRuntime
) -> None:
    sb = await mgr.create(CreateRequest())
    await mgr._vm_exited(sb.id)  # the VM is alive: a stale report
    assert mgr.get(sb.id).state is S.RUNNING


async def test_the_reaper_meeting_an_exited_vm_settles_it_and_retries_nothing(
    store: Store, runtime: FakeRuntime
) -> None:
    now = [1000.0]
    mgr = SandboxManager(ManagerConfig(), store, runtime, clock=lambda: now[0])
    sb = await mgr.create(CreateRequest(timeout_s=10))
    runtime.kill_vm(sb.id)  # nobody watches: the pause finds out
    now[0] += 11
    reaper = Reaper(mgr, clock=lambda: now[0])
    await reaper.sweep()
    assert mgr.get(sb.id).state is S.ERROR  # never paused
    assert reaper.failures(sb.id) == 0
    assert mgr.get(sb.id).pause_failures == 0
    assert reaper.due() == []


async def test_a_pause_of_an_exited_vm_fails_and_settles_it(
    mgr: SandboxManager, runtime: FakeRuntime
) -> None:
    sb = await mgr.create(CreateRequest())
    runtime.kill_vm(sb.id)
    with pytest.raises(Unavailable):
        await mgr.pause(sb.id)
    assert mgr.get(sb.id).state is S.ERROR
    assert set(mgr.get(sb.id).resources) == {"disk"}


async def test_check_host_reinitialises_a_restarted_agent_and_reports_repairs(
    mgr: SandboxManager, runtime: FakeRuntime, store: Store
) -> None:
    sb = await mgr.create(CreateRequest())
    await mgr.check_host()
    assert runtime.agent_inits == []
    assert [e["kind"] for e in store.events() if e["kind"] in ("agent_restarted", "host_repaired")] == []
    runtime.agents_restarted.add(sb.id)
    runtime.host_damage = ["nftables table inet wb"]
    await mgr.check_host()
    assert runtime.agent_inits == [sb.id]
    rec = mgr.get(sb.id)
    assert rec.state is S.RUNNING
    assert rec.error is not None
    assert "agent restarted" in rec.error
    found = [
        (e["kind"], e["sandbox_id"], e["detail"])
        for e in store.events()
        if e["kind"] in ("agent_restarted", "host_repaired")
    ]
    assert found == [
        ("host_repaired", None, {"repaired": ["nftables table inet wb"]}),
        ("agent_restarted", sb.id, {"processes": "lost"}),
    ]
