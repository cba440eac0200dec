"""The inactivity reaper on real VMs: a sandbox idle past its timeout is paused (or killed) by a running
Reaper and resumes intact; any use (exec, file operations, ping) postpones it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from wrenbox import faults
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


async def test_idle_sandboxes_are_paused_or_killed_and_activity_postpones_it(manager: SandboxManager) -> None:
    keep = await manager.create(CreateRequest(timeout_s=TIMEOUT_S))
    kill = await manager.create(CreateRequest(timeout_s=TIMEOUT_S, on_timeout="kill"))
    forever = await manager.create(CreateRequest(timeout_s=0))  # no timeout: never reaped
    contents = Contents.random(1 << 20)
    await contents.write(manager, keep.id)
    await start_counter(manager, keep.id)
    before = await counter(manager, keep.id)

    async with reaping(manager):
        # Used every second in every way, once by a command that runs longer than the timeout (a
        # request in flight is use): the sandbox stays up all along.
        uses = {
            "exec": lambda: manager.exec(keep.id, "true"),
            "file stat": lambda: _stat(manager, keep.id),
            "ping": lambda: _ping(manager, keep.id),
            "long exec": lambda: manager.exec(keep.id, f"sleep {TIMEOUT_S + 1.5}"),
            "exec again": lambda: manager.exec(keep.id, "true"),
        }
        for name, use in uses.items():
            await anyio.sleep(1.0)
            assert manager.get(keep.id).state is S.RUNNING, f"paused before the {name}"
            await use()
            last_used = time.monotonic()
        assert manager.get(kill.id).state is S.DESTROYED  # idle all along: killed

        # Idle now: paused once the timeout has passed (the reaper looks every 0.25 s).
        idle = await wait_until(in_state(manager, keep.id, S.PAUSED), within=TIMEOUT_S + 10) - last_used
        assert TIMEOUT_S - 0.2 < idle < TIMEOUT_S + 5
        assert manager.get(forever.id).state is S.RUNNING

    paused = manager.get(keep.id)
    assert paused.pause_failures == 0
    assert [e["kind"] for e in manager.events(sandbox_id=keep.id)].count("expired") == 1
    resumed = await manager.resume(keep.id)
    assert resumed.timeout_s == TIMEOUT_S
    assert await contents.check(manager, keep.id) == []
    assert "counter" in await process_tags(manager, keep.id)
    assert await counter(manager, keep.id) > before


async def _stat(mgr: SandboxManager, sandbox_id: str) -> None:
    async with mgr.use(sandbox_id) as envd:
        await envd.files.stat("/home/user")


async def _ping(mgr: SandboxManager, sandbox_id: str) -> None:
    mgr.ping(sandbox_id)


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
