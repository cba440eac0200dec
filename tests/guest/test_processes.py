"""The process table directly: fan-out, backpressure, dropping a stalled subscriber, replay bounds."""

from __future__ import annotations

import asyncio
import os

import pytest

from wrenbox.errors import Unavailable
from wrenbox.guest.processes import Exit, ProcessLimits, ProcessTable, Subscription
from wrenbox.guest.spawn import Spawn
from wrenbox.guest.users import default_user


def spawn(script: str, **kwargs: object) -> Spawn:
    return Spawn(
        argv=["/bin/sh", "-c", script],
        env={"PATH": os.environ["PATH"]},
        cwd="/",
        user=default_user()[0],
        stdin=False,
        **kwargs,  # type: ignore[arg-type]
    )


async def drain(sub: Subscription) -> tuple[bytes, Exit]:
    data = b""
    while True:
        item = await sub.next(timeout=30)
        if isinstance(item, Exit):
            return data, item
        assert item is not None, "no output for 30 s"
        data += item[1]


@pytest.mark.anyio
async def test_stalled_subscriber_is_dropped_and_the_process_goes_on() -> None:
    limits = ProcessLimits(ring_bytes=4096, high_water=64 * 1024, low_water=16 * 1024, stall_timeout=0.3)
    table = ProcessTable(limits)
    process = table.start(spawn("head -c 3000000 /dev/zero"), config=None)
    reader = process.subscribe(replay=False)
    stalled = process.subscribe(replay=False)  # never reads
    data, exit = await drain(reader)
    assert len(data) == 3_000_000
    assert exit.exit_code == 0
    with pytest.raises(Unavailable, match="stopped reading"):
        while await stalled.next(timeout=1) is not None:
            pass


@pytest.mark.anyio
async def test_ring_replays_only_recent_output() -> None:
    table = ProcessTable(ProcessLimits(ring_bytes=10_000))
    process = table.start(spawn("seq 1 100000"), config=None)
    await drain(process.subscribe(replay=False))
    late = table.find(pid=process.pid, exited=True).subscribe(replay=True)
    replayed, exit = await drain(late)
    assert exit.exited
    assert replayed.endswith(b"99999\n100000\n")
    assert len(replayed) <= 10_000 + 32 * 1024  # the ring, give or take one read chunk


@pytest.mark.anyio
async def test_exit_of_a_killed_process() -> None:
    table = ProcessTable(ProcessLimits())
    process = table.start(spawn("sleep 30"), config=None)
    sub = process.subscribe(replay=False)
    process.signal(9)
    _, exit = await drain(sub)
    assert (exit.exit_code, exit.exited, exit.status) == (-1, False, "signal: killed")
    assert list(table) == []
    await asyncio.sleep(0)
