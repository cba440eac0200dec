"""Faults that hit a sandbox while the manager runs, on real VMs: its QEMU is killed (as the OOM killer
would), its guest agent dies and is respawned, the host's firewall table is flushed, its paused memory
or device state is damaged. Each ends in one stated state, reported on the sandbox, with nothing of the
dead VM left on the host and nothing durable lost."""

from __future__ import annotations

import os
import signal
import time
from functools import partial
from pathlib import Path

import anyio
import pytest

from wrenbox.config import Settings
from wrenbox.errors import CorruptData, NotRunning
from wrenbox.manager import CreateRequest, SandboxManager
from wrenbox.manager.reaper import Reaper
from wrenbox.network.firewall import host_table_listing
from wrenbox.records import SandboxState
from wrenbox.runtime.files import VM_STATE
from wrenbox.service import Host
from wrenbox.vmm.base import SNAPSHOT_STATE

from .conftest import leftovers
from .guest import DISK_FILE, Contents, guest_sha256, run, sha256
from .test_reaper import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.root]
S = SandboxState
KIB = 1 << 10
AGENT = "wrenbox.guest"  # the agent's command line (busybox init respawns it: images/guest/inittab)


def kill_vmm(mgr: SandboxManager, sandbox_id: str) -> int:
    pid = int(mgr.get(sandbox_id).resources["vm"]["pid"])
    os.kill(pid, signal.SIGKILL)
    return pid


def events(mgr: SandboxManager, sandbox_id: str, kind: str) -> list[dict[str, object]]:
    return [e["detail"] for e in mgr.events(sandbox_id=sandbox_id) if e["kind"] == kind]


async def paused_with_data(mgr: SandboxManager) -> tuple[str, Contents]:
    """A sandbox paused once with known data, then running again from that pause."""
    sb = await mgr.create(CreateRequest())
    kept = Contents.random(64 * KIB)
    await kept.write(mgr, sb.id)
    await mgr.pause(sb.id)
    return sb.id, kept


# -- a VMM that dies under a live manager ------------------------------------------------------------------


async def test_a_killed_vmm_goes_back_to_its_last_pause_at_once(host: Host, settings: Settings) -> None:
    mgr = host.manager
    sandbox_id, kept = await paused_with_data(mgr)
    paused_left = leftovers(settings)  # what a paused sandbox holds on the host: exactly this after the loss
    await mgr.resume(sandbox_id)
    await Contents.random(64 * KIB).write(mgr, sandbox_id)  # after the pause: lost with the VM
    cut: list[BaseException] = []

    async def in_flight() -> None:
        try:
            await mgr.exec(sandbox_id, "sleep 600")
        except NotRunning as exc:
            cut.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(in_flight)
        await anyio.sleep(1.0)  # the command runs
        pid = kill_vmm(mgr, sandbox_id)
        with anyio.fail_after(30):  # noticed by the pidfd, not by a later call or a restart
            await wait_until(lambda: mgr.get(sandbox_id).state is S.PAUSED, within=30)
    rec = mgr.get(sandbox_id)
    assert rec.error is not None
    assert "VM was lost while it ran" in rec.error, rec.error
    assert "last pause" in rec.error
    assert set(rec.resources) == {"disk", "snapshot"}
    assert rec.host_ip is None
    assert len(cut) == 1, cut  # not a hang: cut, saying why
    assert "lost its VM" in str(cut[0])
    assert events(mgr, sandbox_id, "vm_lost") == [{"revertible": True}]
    with pytest.raises(ProcessLookupError):  # reaped, not left a zombie
        os.kill(pid, 0)
    assert leftovers(settings) == paused_left
    assert sandbox_id not in host.runtime._vms
    assert sandbox_id not in host.runtime._clients
    await mgr.resume(sandbox_id)
    assert await kept.check(mgr, sandbox_id) == []  # the pause's data, memory and disk, as it was


async def test_a_killed_vmm_that_was_never_paused_ends_in_error_holding_only_its_disk(
    host: Host, settings: Settings
) -> None:
    mgr = host.manager
    before = leftovers(settings)
    sb = await mgr.create(CreateRequest())
    kill_vmm(mgr, sb.id)
    await wait_until(lambda: mgr.get(sb.id).state is S.ERROR, within=30)
    rec = mgr.get(sb.id)
    assert rec.error is not None
    assert "never paused" in rec.error
    assert set(rec.resources) == {"disk"}  # nothing of the VM; its disk waits for the destroy
    left = leftovers(settings)
    assert {k: v for k, v in left.items() if k not in ("disks", "sandbox dirs")} == before
    assert left["sandbox dirs"] == [sb.id]
    with pytest.raises(NotRunning):
        await mgr.exec(sb.id, "true")
    await mgr.destroy(sb.id)
    assert leftovers(settings) == before


async def test_the_reaper_does_not_retry_the_pause_of_a_gone_vm(host: Host) -> None:
    mgr = host.manager
    sandbox_id, _ = await paused_with_data(mgr)
    await mgr.resume(sandbox_id)
    mgr.set_timeout(sandbox_id, 1)
    await anyio.sleep(1.2)
    reaper = Reaper(mgr)
    kill_vmm(mgr, sandbox_id)
    await reaper.sweep()  # races the exit watch: either one settles it, and nothing is left to retry
    await wait_until(lambda: mgr.get(sandbox_id).state is S.PAUSED, within=30)
    assert reaper.due() == []
    assert reaper.failures(sandbox_id) == 0
    assert mgr.get(sandbox_id).pause_failures == 0


# -- the guest agent dies ------------------------------------------------------------------------------


async def test_a_respawned_agent_is_initialised_again_and_its_old_processes_noted_lost(
    manager: SandboxManager,
) -> None:
    sb = await manager.create(CreateRequest(env={"WB_MARK": "kept"}))
    old = (await run(manager, sb.id, "sleep 600 >/dev/null 2>&1 & echo $!")).strip()
    async with manager.use(sb.id) as envd:
        assert await envd.initialised()
    kill_agent = (
        "for p in /proc/[0-9]*; do "  # the python process running the agent (not this shell, also naming it)
        f'[ "$(cat $p/comm 2>/dev/null)" = python3 ] && grep -q {AGENT} $p/cmdline && agent=${{p#/proc/}}; '
        "done; "
        'setsid sh -c "sleep 1; kill -9 $agent" >/dev/null 2>&1 &'
    )
    await run(manager, sb.id, kill_agent, user="root")
    deadline = time.monotonic() + 90  # python starting again in a TCG guest
    while not events(manager, sb.id, "agent_restarted"):
        assert time.monotonic() < deadline, "the restarted agent was never noticed"
        await manager.check_host()
        await anyio.sleep(0.5)
    assert events(manager, sb.id, "agent_restarted") == [{"processes": "lost"}]
    rec = manager.get(sb.id)
    assert rec.state is S.RUNNING
    assert rec.error is not None
    assert "agent restarted" in rec.error
    assert (await run(manager, sb.id, "echo $WB_MARK")).strip() == "kept"  # env back
    async with manager.use(sb.id) as envd:
        assert await envd.initialised()  # demands the token again
        assert old not in {str(p.pid) for p in await envd.processes.list()}
    await manager.check_host()  # initialised: nothing more to do
    assert len(events(manager, sb.id, "agent_restarted")) == 1


# -- the host's firewall table is flushed ----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flush table", "delete table"])
async def test_a_flushed_host_table_is_put_back_and_reported(host: Host, damage: str) -> None:
    mgr, config = host.manager, host.network.config
    sb = await mgr.create(CreateRequest())
    listing = partial(anyio.to_thread.run_sync, host_table_listing, config)  # netlink: off the loop
    intact = await listing()
    await anyio.run_process(["nft", *damage.split(), "inet", config.prefix])  # this suite's own table
    assert await listing() != intact
    await mgr.check_host()
    assert await listing() == intact
    assert [e["detail"] for e in mgr.events() if e["kind"] == "host_repaired"][-1:] == [
        {"repaired": [f"nftables table inet {config.prefix}"]}
    ]
    assert (await run(mgr, sb.id, "echo ok")).strip() == "ok"


# -- resuming from damaged paused state ------------------------------------------------------------------


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _damage(snapshot: Path, what: str) -> None:
    memfiles = sorted(p for p in snapshot.glob("memfile.*") if p.name != "memfile.header")
    state = snapshot / VM_STATE / SNAPSHOT_STATE
    if what == "memory corrupted":
        _flip_byte(memfiles[-1], memfiles[-1].stat().st_size // 2)
    elif what == "memory truncated":
        os.truncate(memfiles[-1], memfiles[-1].stat().st_size // 2)
    elif what == "device state corrupted":
        _flip_byte(state, state.stat().st_size // 2)
    else:
        os.truncate(state, state.stat().st_size // 2)


@pytest.mark.parametrize(
    "what", ["memory corrupted", "memory truncated", "device state corrupted", "device state truncated"]
)
async def test_a_damaged_snapshot_is_never_run_and_the_disk_boots(
    host: Host, settings: Settings, what: str
) -> None:
    """PAUSED with the error, not ERROR: the snapshot's memory is unusable, but the disk is intact and a
    resume without memory boots from it. Nothing runs on the damaged state; nothing is deleted."""
    mgr = host.manager
    sb = await mgr.create(CreateRequest())
    kept = Contents.random(64 * KIB)
    await kept.write(mgr, sb.id)
    await run(mgr, sb.id, "sync", user="root")  # on the disk, not only in the memory being damaged
    await mgr.pause(sb.id)
    paused_left = leftovers(settings)
    _damage(host.runtime.files.snapshot_dir(sb.id), what)
    with pytest.raises(CorruptData):
        await mgr.resume(sb.id)
    rec = mgr.get(sb.id)
    assert rec.state is S.PAUSED
    assert rec.error is not None
    assert "CorruptData" in rec.error
    assert set(rec.resources) == {"disk", "snapshot"}
    assert leftovers(settings) == paused_left  # no VM, slot, RAM file or cgroup left from the attempt
    await mgr.resume(sb.id, memory=False)  # the disk, as the pause left it, boots
    assert await guest_sha256(mgr, sb.id, DISK_FILE, from_disk=True) == [sha256(kept.disk)]
