"""``wrenbox demo`` (what ``make demo`` runs) on real VMs: every step passes, in order, and leaves nothing;
and each of its checks can fail: a wrong hash, a counter stopped or gone, what a live sandbox holds on the
host, and a failing step is reported under its own name with nothing left behind."""

from __future__ import annotations

import pytest

from wrenbox import demo as demo_mod
from wrenbox.config import Settings
from wrenbox.demo import COUNTER, DEMO_FILE, STEPS, Demo, DemoFailed, DemoStep, run_demo, traces_of
from wrenbox.manager import CreateRequest, SandboxManager

from .conftest import leftovers
from .guest import run, upload

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.root, pytest.mark.slow]


async def test_the_demo_runs_every_step(settings: Settings) -> None:
    steps: list[DemoStep] = []
    assert await run_demo(settings, steps.append)
    assert [(s.step, s.ok) for s in steps] == [(name, True) for name in STEPS]
    assert leftovers(settings) == {}


async def test_each_verify_check_can_fail(manager: SandboxManager, settings: Settings) -> None:
    demo = Demo(manager, lambda step: None, settings.sandboxes_dir)
    sb = await manager.create(CreateRequest())
    await upload(manager, sb.id, DEMO_FILE, b"the file")
    async with manager.use(sb.id) as envd:
        pid = await envd.processes.start(COUNTER, tag="counter")
    await run(manager, sb.id, "sleep 0.5")
    before = await demo.counter(sb.id, pid)

    await demo.check_file(sb.id, b"the file", from_disk=True)
    with pytest.raises(DemoFailed, match="differs"):
        await demo.check_file(sb.id, b"another file", from_disk=True)
    with pytest.raises(DemoFailed, match="written by pid"):
        await demo.counter(sb.id, pid + 1)

    await demo.check_counting(sb.id, pid, before)
    with pytest.raises(DemoFailed, match="did not go on counting"):  # it has not counted to 10**6 yet
        await demo.check_counting(sb.id, pid, 10**6)
    await run(manager, sb.id, f"kill -STOP {pid}", user="root")  # there, but frozen
    with pytest.raises(DemoFailed, match="did not go on counting"):
        await demo.check_counting(sb.id, pid, before)
    await run(manager, sb.id, f"kill -KILL {pid}", user="root")
    with pytest.raises(DemoFailed, match="is gone"):
        await demo.check_counting(sb.id, pid, before)

    held = manager.get(sb.id)
    traces = traces_of(held, settings.sandboxes_dir)
    netns = held.resources["slot"]["netns"]
    assert [t.split(",")[0] for t in traces[:2]] == ["its VMM", f"its network namespace {netns}"]
    assert len(traces) >= 4, traces  # and its RAM file, disk and directory
    await manager.destroy(sb.id)
    assert traces_of(held, settings.sandboxes_dir) == []


async def test_a_failing_step_is_reported_by_name_and_leaves_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A counter that counts once, then stops: the pause and resume go well, "verify" must not.
    monkeypatch.setattr(demo_mod, "COUNTER", "echo $$ 1 > /dev/shm/counter; sleep 1000")
    steps: list[DemoStep] = []
    assert not await run_demo(settings, steps.append)
    assert [(s.step, s.ok) for s in steps] == [(n, True) for n in STEPS[:5]] + [("verify", False)]
    assert "did not go on counting" in steps[-1].detail
    assert leftovers(settings) == {}
