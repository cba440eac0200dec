"""The reaper on real VMs: a sandbox at the end of its lifetime is paused (or killed) by a running Reaper,
even in use (a command in flight is cut), and resumes intact; ``set_timeout`` and ``ping`` move the end."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from wrenbox import faults
from wrenbox.errors import NotRunning
from wrenbox.manager import CreateRequest, SandboxManager
from wrenbox.manager.reaper import Reaper, ReaperConfig
from wrenbox.records import SandboxState

from .guest import Contents, counter, process_tags, start_counter

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.root]
S = SandboxState
TIMEOUT_S = 3


@asynccontextmanager
async def reaping(mgr: SandboxManager) -> AsyncIterator[Reaper]:
    reaper = Reaper(mgr, ReaperConfig(interval_s=0.25))
    async with anyio.create_task_group() as tg:
        tg.start_soon(reaper.run)
        yield reaper
        tg.cancel_scope.cancel()


async def wait_until(check: Callable[[], bool], within: float) -> float:
    """The time (``time.monotonic()``) ``check()`` was first seen true; fails after ``within`` s."""
    with anyio.fail_after(within):
        while True:
            if check():
                return time.monotonic()
            await anyio.sleep(0.1)


def in_state(mgr: SandboxManager, sandbox_id: str, state: S) -> Callable[[], bool]:
    return lambda: mgr.get(sandbox_id).state is state


async def test_sandboxes_end_on_time_in_use_or_not_unless_given_more(manager: SandboxManager) -> None:
    forever = await manager.create(CreateRequest(timeout_s=0))  # no timeout: never reaped
    start = time.monotonic()  # the others end TIMEOUT_S after their creation, which follows
    keep = await manager.create(CreateRequest(timeout_s=TIMEOUT_S))
    kill = await manager.create(CreateRequest(timeout_s=TIMEOUT_S, on_timeout="kill"))
    later = await manager.create(CreateRequest(timeout_s=TIMEOUT_S))
    manager.set_timeout(later.id, TIMEOUT_S + 4)
    contents = Contents.random(1 << 20)
    await contents.write(manager, keep.id)
    await start_counter(manager, keep.id)
    before = await counter(manager, keep.id)
    cut: list[BaseException] = []

    async def long_command() -> None:
        try:
            await manager.exec(keep.id, f"sleep {TIMEOUT_S + 20}", timeout=TIMEOUT_S + 30)
        except NotRunning as exc:
            cut.append(exc)

    async with reaping(manager), anyio.create_task_group() as tg:
        tg.start_soon(long_command)  # in use all along: E2B's lifetimes do not care
        ended = await wait_until(in_state(manager, keep.id, S.PAUSED), within=10) - start
        assert TIMEOUT_S - 0.2 < ended < TIMEOUT_S + 5
        await wait_until(lambda: bool(cut), within=10)  # the command's stream was cut by the pause
        await wait_until(in_state(manager, kill.id, S.DESTROYED), within=10)
        assert manager.get(later.id).state is S.RUNNING
        manager.ping(later.id)  # no sooner than its timeout from now: unchanged, it already has more
        moved = await wait_until(in_state(manager, later.id, S.PAUSED), within=15) - start
        assert TIMEOUT_S + 4 - 0.2 < moved < TIMEOUT_S + 12
        assert manager.get(forever.id).state is S.RUNNING

    paused = manager.get(keep.id)
    assert paused.pause_failures == 0
    assert [e["kind"] for e in manager.events(sandbox_id=keep.id)].count("expired") == 1
    resumed = await manager.resume(keep.id)
    assert resumed.timeout_s == TIMEOUT_S
    assert resumed.end_at is not None
    assert resumed.end_at > time.time() + TIMEOUT_S - 1  # a whole lifetime again, from the resume
    manager.set_timeout(keep.id, None)  # and then no end at all
    assert await contents.check(manager, keep.id) == []
    assert "counter" in await process_tags(manager, keep.id)
    assert await counter(manager, keep.id) > before


async def test_a_failed_auto_pause_is_retried_and_the_sandbox_kept(manager: SandboxManager) -> None:
    sb = await manager.create(CreateRequest(timeout_s=1))
    contents = Contents.random(1 << 20)
    await contents.write(manager, sb.id)
    reaper = Reaper(manager, ReaperConfig(interval_s=0.2, backoff_initial_s=0.5))
    async with anyio.create_task_group() as tg:
        with faults.armed("pause.memory"):
            tg.start_soon(reaper.run)
            await wait_until(lambda: manager.get(sb.id).pause_failures >= 2, within=15)
            assert manager.get(sb.id).state is S.RUNNING  # kept, never destroyed for it
            assert reaper.failures(sb.id) >= 2
        await wait_until(in_state(manager, sb.id, S.PAUSED), within=15)  # retried once the fault is gone
        tg.cancel_scope.cancel()
    assert manager.get(sb.id).pause_failures == 0
    await manager.resume(sb.id)
    assert await contents.check(manager, sb.id) == []
