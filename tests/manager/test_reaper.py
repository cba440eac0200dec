"""Reaper policy against a fake manager and a fake clock (the real-VM reaper test lives with the manager)."""

from __future__ import annotations

import anyio
import pytest

from wrenbox.manager.reaper import Reaper, ReaperConfig
from wrenbox.records import SandboxRecord, SandboxState


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeManager:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.records: dict[str, SandboxRecord] = {}
        self.expired: list[tuple[str, str]] = []
        self.fail: set[str] = set()
        self.slow: set[str] = set()
        self.stall: dict[str, float] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    def add(self, sid: str, timeout_s: int, age_s: float, on_timeout: str = "pause") -> None:
        """A sandbox that started ``age_s`` ago to run ``timeout_s`` (0: for ever)."""
        started = self.clock.now - age_s
        self.records[sid] = SandboxRecord(
            id=sid,
            template="t",
            state=SandboxState.RUNNING,
            timeout_s=timeout_s,
            on_timeout=on_timeout,
            end_at=started + timeout_s if timeout_s > 0 else None,
        )

    def list_running(self) -> list[SandboxRecord]:
        return [r for r in self.records.values() if r.state is SandboxState.RUNNING]

    async def expire(self, sandbox_id: str, action: str) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if sandbox_id in self.slow:
                await anyio.sleep(0.05)
            await anyio.sleep(self.stall.get(sandbox_id, 0))
            if sandbox_id in self.fail:
                raise RuntimeError("qmp timeout")
            self.expired.append((sandbox_id, action))
            self.records[sandbox_id].state = SandboxState.PAUSED
        finally:
            self.in_flight -= 1


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mgr(clock: FakeClock) -> FakeManager:
    return FakeManager(clock)


@pytest.mark.anyio
async def test_only_sandboxes_past_their_end_expire(mgr: FakeManager, clock: FakeClock) -> None:
    mgr.add("idle0001", timeout_s=3, age_s=5)
    mgr.add("young001", timeout_s=3, age_s=1)
    mgr.add("never001", timeout_s=0, age_s=10_000)
    mgr.add("kill0001", timeout_s=3, age_s=4, on_timeout="kill")
    await Reaper(mgr, clock=clock).sweep()
    assert sorted(mgr.expired) == [("idle0001", "pause"), ("kill0001", "kill")]


@pytest.mark.anyio
async def test_failed_pause_backs_off_and_is_never_a_destroy(mgr: FakeManager, clock: FakeClock) -> None:
    reaper = Reaper(mgr, ReaperConfig(backoff_initial_s=2, backoff_max_s=5), clock=clock)
    mgr.add("flaky001", timeout_s=3, age_s=5)
    mgr.fail.add("flaky001")
    await reaper.sweep()
    assert reaper.failures("flaky001") == 1
    assert mgr.records["flaky001"].state is SandboxState.RUNNING
    await reaper.sweep()  # within backoff: not retried
    assert reaper.failures("flaky001") == 1
    clock.now += 2.1
    await reaper.sweep()
    assert reaper.failures("flaky001") == 2
    clock.now += 2.1  # backoff is now 4 s
    await reaper.sweep()
    assert reaper.failures("flaky001") == 2
    mgr.fail.clear()
    clock.now += 2.0
    await reaper.sweep()
    assert mgr.expired == [("flaky001", "pause")]
    assert reaper.failures("flaky001") == 0


@pytest.mark.anyio
async def test_more_time_resets_the_backoff(mgr: FakeManager, clock: FakeClock) -> None:
    reaper = Reaper(mgr, clock=clock)
    mgr.add("flaky001", timeout_s=3, age_s=5)
    mgr.fail.add("flaky001")
    await reaper.sweep()
    assert reaper.failures("flaky001") == 1
    mgr.records["flaky001"].end_at = clock.now + 60  # someone gave it more time
    await reaper.sweep()
    assert reaper.failures("flaky001") == 0


@pytest.mark.anyio
async def test_expiries_run_concurrently_but_bounded(mgr: FakeManager, clock: FakeClock) -> None:
    for i in range(5):
        mgr.add(f"slow{i:04d}", timeout_s=1, age_s=2)
        mgr.slow.add(f"slow{i:04d}")
    with anyio.fail_after(5):
        await Reaper(mgr, ReaperConfig(concurrency=2), clock=clock).sweep()
    assert len(mgr.expired) == 5
    assert mgr.max_in_flight == 2


@pytest.mark.anyio
async def test_a_slow_expiry_does_not_hold_up_the_next(mgr: FakeManager, clock: FakeClock) -> None:
    mgr.add("slow0001", timeout_s=1, age_s=2)
    mgr.stall["slow0001"] = 3.0  # a pause that takes its time
    reaper = Reaper(mgr, ReaperConfig(interval_s=0.05), clock=clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reaper.run)
        await anyio.sleep(0.2)
        mgr.add("next0001", timeout_s=1, age_s=2)
        with anyio.fail_after(1):
            while ("next0001", "pause") not in mgr.expired:  # noqa: ASYNC110 (polling the fake)
                await anyio.sleep(0.02)
        assert ("slow0001", "pause") not in mgr.expired  # still going
        tg.cancel_scope.cancel()
