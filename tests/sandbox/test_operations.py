"""Operations on real sandboxes besides the lifecycle moves: exec (collect, cap, exit codes), exec
streams, list/get filters, ping and timeouts, metrics, admission limits, and exec against a pausing VM."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from wrenbox.config import Settings
from wrenbox.envd.models import Exited, Started, Stderr, Stdout
from wrenbox.errors import AlreadyExists, InvalidArgument, NotFound, NotRunning, Timeout, Unavailable
from wrenbox.manager import CreateRequest, SandboxManager
from wrenbox.records import SandboxRecord, SandboxState
from wrenbox.service import Host

from .conftest import leftovers, policy
from .guest import run

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.root]
S = SandboxState
MIB = 1 << 20


async def test_exec_collects_caps_and_reports_exit_codes(host: Host, manager: SandboxManager) -> None:
    sb = await manager.create(CreateRequest())
    ok = await manager.exec(sb.id, "echo out; echo err >&2")
    assert (ok.exit_code, ok.stdout, ok.stderr) == (0, b"out\n", b"err\n")
    assert not ok.stdout_truncated

    failed = await manager.exec(sb.id, "echo partial; exit 3")
    assert (failed.exit_code, failed.stdout) == (3, b"partial\n")

    big = "head -c 5000 /dev/zero | tr '\\0' a; head -c 3000 /dev/zero | tr '\\0' b >&2"
    capped = await manager.exec(sb.id, big, output_cap=1000)
    assert capped.exit_code == 0
    assert (capped.stdout, capped.stdout_truncated) == (b"a" * 1000, True)
    assert (capped.stderr, capped.stderr_truncated) == (b"b" * 1000, True)

    # The manager's configured cap applies when the caller gives none.
    small = policy(host, exec_output_cap_bytes=1024)
    by_config = await small.exec(sb.id, "head -c 4096 /dev/zero | tr '\\0' c")
    assert (len(by_config.stdout), by_config.stdout_truncated) == (1024, True)
    uncapped = await manager.exec(sb.id, "head -c 4096 /dev/zero | tr '\\0' c")
    assert (len(uncapped.stdout), uncapped.stdout_truncated) == (4096, False)

    # A command past its deadline is killed, and says so.
    with pytest.raises(Timeout):
        await manager.exec(sb.id, "sleep 31.5", timeout=1.0)
    running = await run(manager, sb.id, "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done")
    assert "sleep 31.5" not in running
    assert "/cmdline" in running  # the listing itself is there: it can see processes


async def test_exec_stream_yields_events_as_they_happen(manager: SandboxManager) -> None:
    sb = await manager.create(CreateRequest())
    cmd = "for i in 1 2 3; do echo $i; sleep 0.3; done; echo done >&2; exit 4"
    events: list[tuple[float, Any]] = []
    async for event in manager.exec_stream(sb.id, cmd):
        events.append((time.monotonic(), event))
    kinds = [type(e) for _, e in events]
    assert kinds[0] is Started
    assert events[0][1].pid > 0
    assert isinstance(events[-1][1], Exited)
    assert events[-1][1].exit_code == 4
    assert b"".join(e.data for _, e in events if isinstance(e, Stdout)) == b"1\n2\n3\n"
    assert b"".join(e.data for _, e in events if isinstance(e, Stderr)) == b"done\n"
    # Streamed, not collected: the first line arrived well before the process ended.
    first_out = next(t for t, e in events if isinstance(e, Stdout))
    assert events[-1][0] - first_out >= 0.5


async def test_list_and_get_filter_on_state_and_metadata(manager: SandboxManager) -> None:
    a = await manager.create(CreateRequest(metadata={"team": "a", "tier": "gold"}))
    b = await manager.create(CreateRequest(metadata={"team": "b", "tier": "gold"}))
    await manager.pause(b.id)

    def ids(**filters: Any) -> set[str]:
        return {r.id for r in manager.list(**filters)}

    assert ids() == {a.id, b.id}
    assert ids(states={S.RUNNING}) == {a.id}
    assert ids(states={S.PAUSED}) == {b.id}
    assert ids(states={S.RUNNING, S.PAUSED}) == {a.id, b.id}
    assert ids(metadata={"team": "b"}) == {b.id}
    assert ids(metadata={"tier": "gold"}) == {a.id, b.id}
    assert ids(metadata={"team": "a", "tier": "gold"}) == {a.id}
    assert ids(metadata={"team": "a", "tier": "silver"}) == set()
    assert ids(states={S.PAUSED}, metadata={"team": "a"}) == set()
    assert [r.id for r in manager.list_running()] == [a.id]
    got = manager.get(b.id)
    assert (got.state, got.metadata) == (S.PAUSED, {"team": "b", "tier": "gold"})

    await manager.destroy(a.id)
    assert ids() == {b.id}
    assert a.id in ids(states={S.DESTROYED})
    with pytest.raises(NotFound):
        manager.get("nosuchsandbox")


async def test_ping_and_set_timeout(host: Host, manager: SandboxManager) -> None:
    sb = await manager.create(CreateRequest(timeout_s=60))
    end = manager.get(sb.id).end_at
    assert end is not None
    assert abs(end - (time.time() + 60)) < 5
    before = manager.get(sb.id).last_active_at
    await anyio.sleep(0.05)
    manager.ping(sb.id)
    assert manager.get(sb.id).last_active_at > before
    assert manager.get(sb.id).end_at >= end  # no sooner than its timeout from now

    updated = manager.set_timeout(sb.id, 7)  # sooner
    assert abs(updated.end_at - (time.time() + 7)) < 2
    assert host.store.get_sandbox(sb.id).end_at == updated.end_at  # persisted, not only in memory
    with pytest.raises(InvalidArgument):
        manager.set_timeout(sb.id, -1)
    with pytest.raises(InvalidArgument):
        manager.set_timeout(sb.id, "10")  # type: ignore[arg-type]
    assert host.store.get_sandbox(sb.id).end_at == updated.end_at
    assert (await manager.connect(sb.id, timeout_s=1)).end_at == updated.end_at  # never shortens
    longer = await manager.connect(sb.id, timeout_s=600)
    assert longer.end_at > updated.end_at + 500

    await manager.pause(sb.id)
    with pytest.raises(NotRunning):
        manager.ping(sb.id)
    resumed = await manager.connect(sb.id, timeout_s=45)  # connecting to a paused sandbox resumes it
    assert resumed.state is S.RUNNING
    assert abs(resumed.end_at - (time.time() + 45)) < 5
    await manager.destroy(sb.id)
    with pytest.raises(NotFound):
        manager.ping(sb.id)
    with pytest.raises(NotFound):
        manager.set_timeout(sb.id, 10)


async def test_metrics_are_plausible(manager: SandboxManager) -> None:
    sb = await manager.create(CreateRequest())
    first = await manager.metrics(sb.id)
    usage, guest = first.host, first.guest
    assert first.state is S.RUNNING
    assert guest is not None
    memory = sb.memory_mb * MIB
    assert 16 * MIB < usage["vmm_rss_bytes"] < memory + 512 * MIB
    assert usage["vmm_cpu_seconds"] > 0
    assert 0 < usage["ram_file_bytes"] <= memory
    assert usage["disk_bytes"] > 0
    assert guest.cpu_count == sb.vcpus
    assert 0.6 * memory < guest.mem_total <= memory
    assert 0 < guest.mem_used < guest.mem_total
    assert 0 < guest.disk_used < guest.disk_total
    assert abs(guest.timestamp - time.time()) < 30  # /init set the restored guest's clock

    # Memory the guest touches shows up on both sides.
    await run(manager, sb.id, "head -c 48M /dev/urandom > /dev/shm/fill")
    second = await manager.metrics(sb.id)
    assert second.guest is not None
    assert second.guest.mem_used - guest.mem_used > 32 * MIB
    assert second.host["ram_file_bytes"] - usage["ram_file_bytes"] > 32 * MIB
    assert second.host["vmm_cpu_seconds"] > usage["vmm_cpu_seconds"]

    await manager.pause(sb.id)
    paused = await manager.metrics(sb.id)
    assert (paused.state, paused.guest) == (S.PAUSED, None)
    assert set(paused.host) == {
        "disk_bytes",
        "snapshot_bytes",
        "snapshot_memory_bytes",
        "snapshot_memory_file_bytes",
    }
    assert 32 * MIB < paused.host["snapshot_bytes"] < memory
    # The snapshot holds the guest's non-zero memory (the 48 MiB of random data and more), and on disk
    # costs about what it holds.
    assert 48 * MIB < paused.host["snapshot_memory_bytes"] < memory
    assert 0.99 < paused.host["snapshot_memory_file_bytes"] / paused.host["snapshot_memory_bytes"] < 1.05


async def test_limits_refuse_with_unavailable_and_change_nothing(
    host: Host, manager: SandboxManager, settings: Settings
) -> None:
    one = policy(host, max_sandboxes=1)
    a = await one.create(CreateRequest())
    records = {r.id: r.state for r in manager.list(states=set(S))}
    held = leftovers(settings)
    with pytest.raises(Unavailable, match="limit"):
        await one.create(CreateRequest())
    assert {r.id: r.state for r in manager.list(states=set(S))} == records
    assert leftovers(settings) == held

    # A paused sandbox does not count; resuming it does.
    await one.pause(a.id)
    b = await one.create(CreateRequest())
    with pytest.raises(Unavailable):
        await one.resume(a.id)
    assert manager.get(a.id).state is S.PAUSED
    await one.destroy(b.id)

    # One start at a time: of two starts at once, one is refused at once and the other completes.
    serial = policy(host, max_concurrent_starts=1)
    outcomes: dict[str, str] = {}

    async def attempt(name: str, op: Any) -> None:
        try:
            rec: SandboxRecord = await op()
            outcomes[name] = rec.state.value
        except Unavailable:
            outcomes[name] = "unavailable"

    async with anyio.create_task_group() as tg:
        tg.start_soon(attempt, "resume", lambda: serial.resume(a.id))
        tg.start_soon(attempt, "create", lambda: serial.create(CreateRequest()))
    assert sorted(outcomes.values()) == ["running", "unavailable"]
    assert manager.get(a.id).state.value == outcomes["resume"].replace("unavailable", "paused")
    assert (await serial.resume(a.id)).state is S.RUNNING  # refused only while the other one started


async def test_exec_against_a_pausing_sandbox_fails_fast(host: Host, manager: SandboxManager) -> None:
    sb = await manager.create(CreateRequest())
    rt = host.runtime
    real_pause = rt.pause
    during_pause: list[BaseException] = []

    async def observed_pause(rec: SandboxRecord, ledger: Any, *, memory: bool) -> None:
        # The sandbox is 'pausing' now: a new request must be refused at once, not queued.
        assert manager.get(rec.id).state is S.PAUSING
        t0 = time.monotonic()
        try:
            await manager.exec(rec.id, "true")
        except NotRunning as exc:
            during_pause.append(exc)
        assert time.monotonic() - t0 < 1.0
        await real_pause(rec, ledger, memory=memory)

    rt.pause = observed_pause  # type: ignore[method-assign]
    outcomes: dict[str, tuple[BaseException | None, float]] = {}

    async def long_request(name: str, request: Callable[[], Awaitable[Any]]) -> None:
        try:
            await request()
            error = None
        except Exception as exc:
            error = exc
        outcomes[name] = (error, time.monotonic())

    async def stream() -> None:
        async for _ in manager.exec_stream(sb.id, "sleep 120 # stream"):
            pass

    async def long_requests_running() -> None:
        while True:
            async with manager.use(sb.id) as envd:
                running = [" ".join(p.args) for p in await envd.processes.list()]
            if sum("sleep 120" in args for args in running) == 2:
                return
            await anyio.sleep(0.1)

    try:
        with anyio.fail_after(30):  # never hangs on the frozen VM
            async with anyio.create_task_group() as tg:
                tg.start_soon(long_request, "exec", lambda: manager.exec(sb.id, "sleep 120 # collect"))
                tg.start_soon(long_request, "exec_stream", stream)
                await long_requests_running()
                t0 = time.monotonic()
                await manager.pause(sb.id)
                paused_at = time.monotonic()
    finally:
        del rt.pause
    assert len(during_pause) == 1
    for name, (error, at) in outcomes.items():
        assert isinstance(error, NotRunning), f"the running {name} ended with {error!r}"
        assert at - t0 < 5.0, name
    assert paused_at - t0 < 10.0
    await manager.resume(sb.id)
    assert await run(manager, sb.id, "echo back") == "back\n"


async def test_bad_requests_are_refused_and_change_nothing(
    manager: SandboxManager, settings: Settings
) -> None:
    sb = await manager.create(CreateRequest())
    records = {r.id: (r.state, r.resources) for r in manager.list(states=set(S))}
    held = leftovers(settings)
    bad: list[tuple[type[Exception], CreateRequest]] = [
        (InvalidArgument, CreateRequest(template="../minimal")),
        (NotFound, CreateRequest(template="no-such-template")),
        (InvalidArgument, CreateRequest(metadata={"n": 1})),  # type: ignore[dict-item]
        (InvalidArgument, CreateRequest(env={"": "empty name"})),
        (InvalidArgument, CreateRequest(timeout_s=-5)),
        (InvalidArgument, CreateRequest(on_timeout="explode")),  # type: ignore[arg-type]
        (InvalidArgument, CreateRequest(sandbox_id="../../etc")),
        (InvalidArgument, CreateRequest(sandbox_id="UPPER")),
        (AlreadyExists, CreateRequest(sandbox_id=sb.id)),
    ]
    for error, req in bad:
        with pytest.raises(error):
            await manager.create(req)
        assert {r.id: (r.state, r.resources) for r in manager.list(states=set(S))} == records, req
        assert leftovers(settings) == held, req
    for sandbox_id in ("../../etc", "a/b", "x" * 100):
        with pytest.raises((InvalidArgument, NotFound)):
            await manager.pause(sandbox_id)
        with pytest.raises((InvalidArgument, NotFound)):
            await manager.exec(sandbox_id, "true")
    assert await run(manager, sb.id, "echo fine") == "fine\n"
