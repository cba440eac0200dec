"""The manager's face on real VMs, beyond the lifecycle the other files cover: pausing to the disk only
(the guest boots again on resume, its files kept), resuming from the disk though the memory was kept,
and routing traffic to a guest port for a proxy."""

from __future__ import annotations

import anyio
import httpx
import pytest

from wrenbox.errors import Conflict, NotRunning
from wrenbox.manager import CreateRequest, SandboxManager
from wrenbox.records import SandboxState
from wrenbox.service import Host

from .guest import DISK_FILE, TMPFS_FILE, Contents, agent_status, process_tags, run, sha256, start_counter

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.root, pytest.mark.slow]
S = SandboxState
BOOT_ID = "cat /proc/sys/kernel/random/boot_id"


async def boot_id(mgr: SandboxManager, sandbox_id: str) -> str:
    return (await run(mgr, sandbox_id, BOOT_ID)).strip()


async def files_left(mgr: SandboxManager, sandbox_id: str, contents: Contents) -> list[str]:
    """Which of the two integrity files are there, intact (read back from the disk, not the cache)."""
    out = await run(
        mgr,
        sandbox_id,
        f"sync; echo 3 > /proc/sys/vm/drop_caches; sha256sum {TMPFS_FILE} {DISK_FILE}; true",
        user="root",
    )
    found = {line.split()[1]: line.split()[0] for line in out.splitlines()}
    expected = {TMPFS_FILE: sha256(contents.tmpfs), DISK_FILE: sha256(contents.disk)}
    return [path for path, digest in expected.items() if found.get(path) == digest]


async def test_a_disk_only_pause_keeps_the_files_and_boots_again(host: Host, manager: SandboxManager) -> None:
    sb = await manager.create(CreateRequest(env={"KEPT": "yes"}))
    contents = Contents.random(1 << 20)
    await contents.write(manager, sb.id)  # one file on the disk, one in guest RAM (tmpfs)
    await start_counter(manager, sb.id)
    first_boot = await boot_id(manager, sb.id)
    assert await files_left(manager, sb.id, contents) == [TMPFS_FILE, DISK_FILE]
    token = manager.get(sb.id).access_token

    await manager.pause(sb.id, memory=False)
    paused = await manager.metrics(sb.id)
    assert paused.state is S.PAUSED
    assert "snapshot_memory_bytes" not in paused.host  # no memory was written
    assert paused.host["snapshot_bytes"] < 64 << 10
    with pytest.raises(Conflict, match="without its memory"):
        await manager.snapshot(sb.id, "from-disk-only")
    assert [t.name for t in manager.templates()] == ["minimal"]

    rec = await manager.resume(sb.id)
    assert rec.state is S.RUNNING
    assert await boot_id(manager, sb.id) != first_boot  # a fresh boot ...
    assert await files_left(manager, sb.id, contents) == [DISK_FILE]  # ... the disk's file kept
    assert "counter" not in await process_tags(manager, sb.id)  # processes did not survive
    assert await run(manager, sb.id, "echo $KEPT") == "yes\n"  # the sandbox's env is stated again
    assert rec.access_token == token  # and so is its token, which the agent demands again
    assert await agent_status(rec, token) == 200
    assert await agent_status(rec, None) == 401

    # The next pause keeps the memory again, from a fresh chain.
    second_boot = await boot_id(manager, sb.id)
    await manager.pause(sb.id)
    assert (await manager.metrics(sb.id)).host["snapshot_memory_bytes"] > 0
    await manager.resume(sb.id)
    assert await boot_id(manager, sb.id) == second_boot

    # A resume may ignore a memory snapshot and boot from the disk (E2B's on_resume="reboot").
    await manager.pause(sb.id)
    await manager.resume(sb.id, memory=False)
    assert await boot_id(manager, sb.id) not in (first_boot, second_boot)
    assert await files_left(manager, sb.id, contents) == [DISK_FILE]
    await manager.destroy(sb.id)


async def test_route_reaches_a_guest_port_and_ends_with_the_sandbox(manager: SandboxManager) -> None:
    sb = await manager.create(CreateRequest())
    await run(manager, sb.id, "mkdir -p /tmp/www && echo served-from-the-guest > /tmp/www/index.html")
    async with manager.use(sb.id) as envd:
        await envd.processes.start("cd /tmp/www && exec python3 -m http.server 8000", tag="web")
    async with manager.route(sb.id, 8000) as address:
        assert address.port == 8000
        async with httpx.AsyncClient(timeout=5) as http:
            with anyio.fail_after(60):
                while True:
                    try:
                        response = await http.get(f"http://{address.host}:{address.port}/index.html")
                        break
                    except httpx.TransportError:
                        await anyio.sleep(0.2)
    assert response.text == "served-from-the-guest\n"

    # A route held while the sandbox pauses is cut, instead of streaming into a stopped VM.
    cut: list[BaseException] = []

    async def hold() -> None:
        try:
            async with manager.route(sb.id, 8000):
                await anyio.sleep_forever()
        except NotRunning as exc:
            cut.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await anyio.sleep(0.2)
        await manager.pause(sb.id)
    assert len(cut) == 1
    with pytest.raises(NotRunning):
        async with manager.route(sb.id, 8000):
            pass
