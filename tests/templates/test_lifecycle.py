"""Sandboxes from a template, end to end on real VMs: restore, exec, pause, restore elsewhere, clones."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from dataclasses import replace

import anyio
import pytest
from tests.templates.conftest import (
    Sandbox,
    Sandboxes,
    network_leftovers,
    processes_using,
    sha256,
    unreaped_children,
)

from wrenbox.command import run
from wrenbox.errors import GuestError
from wrenbox.launch import Launcher, agent_client
from wrenbox.network import Network
from wrenbox.rootfs import RootfsBackend
from wrenbox.templates import Template
from wrenbox.vmm.qemu import QemuDriver

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.slow, pytest.mark.anyio]

# Written then renamed: a reader never catches the file empty between truncate and write.
COUNTER = (
    "i=0; while :; do i=$((i+1)); echo $i > /dev/shm/counter.new; "
    "mv /dev/shm/counter.new /dev/shm/counter; sleep 0.05; done"
)


async def counter(sandbox: Sandbox) -> int:
    return int((await sandbox.sh("cat /dev/shm/counter")).strip())


async def counts_on(sandbox: Sandbox, at_least: int) -> int:
    """The counter's value once it has moved past ``at_least``: the counting process is alive."""
    deadline = time.monotonic() + 20
    while (value := await counter(sandbox)) <= at_least:
        assert time.monotonic() < deadline, f"counter stuck at {value}"
        await asyncio.sleep(0.1)
    return value


async def test_restore_exec_pause_and_restore_into_another_slot(
    sandboxes: Sandboxes, network: Network, rootfs: RootfsBackend, template: Template
) -> None:
    a = await sandboxes.start(2)
    assert (await a.sh("uname -r")).strip() == template.manifest.kernel_release
    guest_now = float(await a.sh("date +%s.%N"))
    assert abs(guest_now - time.time()) < 3, "POST /init set the guest clock"

    pid = await a.agent.processes.start(["/bin/sh", "-c", COUNTER], tag="counter")
    token = secrets.token_hex(16)
    await a.sh(f"echo {token} > /dev/shm/marker && echo {token} > $HOME/on-disk && sync")
    before = await counts_on(a, 3)

    # Pause: only the device state is written; the RAM file is the memory snapshot.
    first = await sandboxes.pause(a)
    assert first.meta.state_bytes < 1 << 20
    assert processes_using(a.dir) == []
    await sandboxes.remove_slot(2)

    await sandboxes.resume(a, first, 3)
    assert (await a.sh("cat /dev/shm/marker $HOME/on-disk")).split() == [token, token]
    survived = await counter(a)
    assert survived >= before, "the counter restarted: the process's memory was lost"
    await counts_on(a, survived)
    (info,) = [p for p in await a.agent.processes.list() if p.tag == "counter"]
    assert info.pid == pid

    # Once more, into a third slot.
    second = await sandboxes.pause(a)
    await sandboxes.resume(a, second, 4)
    assert (await a.sh("cat /dev/shm/marker")).strip() == token
    await counts_on(a, await counter(a))

    # Destroy: nothing of the sandbox may remain.
    slot = a.slot
    await sandboxes.close()
    assert processes_using(a.dir) == []
    assert unreaped_children() == []
    assert not a.dir.exists()
    assert not any(p.name.startswith(a.disk.id) for p in rootfs.config.disks_dir.iterdir())
    assert await anyio.to_thread.run_sync(network_leftovers, network.config.prefix) == []
    ruleset = run(["nft", "list", "ruleset"]).text
    assert str(slot.host_ip) not in ruleset


async def test_two_clones_at_once_are_independent_and_differ_in_random_state(
    sandboxes: Sandboxes, template: Template
) -> None:
    before = {p: sha256(p) for p in (template.memory, template.rootfs)}
    c, d = await asyncio.gather(sandboxes.start(5), sandboxes.start(6))
    assert (d.dir / "memory").stat().st_size == template.manifest.memory_mib << 20

    random_bytes = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
    rc, rd = await asyncio.gather(c.sh(random_bytes), d.sh(random_bytes))
    assert len(rc) == len(rd) == 64
    assert rc != rd, "clones of one snapshot produced the same random bytes: /init did not reseed"

    await c.sh("echo c > $HOME/who && echo c > /dev/shm/who")
    assert await d.sh("cat $HOME/who /dev/shm/who 2>/dev/null || echo none") == "none\n"
    await d.sh("echo d > $HOME/who")
    assert (await c.sh("cat $HOME/who")).strip() == "c"

    await sandboxes.close()
    assert {p: sha256(p) for p in before} == before, "a clone wrote into the template"


async def test_snapshot_then_resume_keeps_the_vm_running(sandboxes: Sandboxes, launcher: Launcher) -> None:
    e = await sandboxes.start(7)
    await e.sh("echo before > $HOME/f && sync")
    dest = e.dir / "snap"
    dest.mkdir()
    snapshot = await e.vm.snapshot(dest)
    assert snapshot.state_path.stat().st_size == snapshot.meta.state_bytes
    assert await e.vm.status() == "postmigrate"
    await e.vm.resume()
    assert await e.vm.status() == "running"
    # Migration handed the disk over; after resume the VM must own (and write) it again.
    assert (await e.sh("echo after >> $HOME/f && sync && cat $HOME/f")).split() == ["before", "after"]

    await e.vm.pause()
    assert await e.vm.status() == "paused"
    await e.vm.resume()
    assert (await e.sh("echo ok")).strip() == "ok"

    # A wrenbox that restarted finds the VM by its process reference and can still drive it.
    adopted = launcher.adopt(sandboxes.placement(e.dir, e.disk, e.slot), e.vm.process, **sandboxes.machine)
    assert await adopted.status() == "running"
    await adopted.destroy()
    assert not e.vm.alive()


async def test_a_restored_agent_takes_its_first_init_only_from_the_host(
    sandboxes: Sandboxes, launcher: Launcher, template: Template
) -> None:
    """Finding 12: between a restore and the host's /init, anyone who reaches the agent's port must get
    nothing: neither set their own token first (denying the host) nor run a command."""
    async with sandboxes.placed(9, "raced") as placement:
        slot = placement.slot
        async with agent_client(slot) as stranger, agent_client(slot, template.manifest.agent_token) as host:
            vm = await launcher.restore(placement, template.snapshot(), **sandboxes.machine, agent=stranger)
            try:
                with pytest.raises(GuestError, match="unauthenticated"):
                    await stranger.init(access_token="the-strangers-own")
                with pytest.raises(GuestError, match="unauthenticated"):
                    await stranger.processes.exec(["true"])
                await host.init(access_token="the-sandboxes-own")  # the host's token still works
                assert (await host.processes.exec(["true"])).exit_code == 0
                # And now only the sandbox's own token does.
                async with agent_client(slot, template.manifest.agent_token) as late:
                    with pytest.raises(GuestError, match="unauthenticated"):
                        await late.processes.exec(["true"])
            finally:
                await vm.destroy()


async def test_destroy_kills_a_vmm_that_does_not_answer(
    sandboxes: Sandboxes, launcher: Launcher, template: Template
) -> None:
    patience = replace(launcher.driver.config, quit_timeout_s=0.5, kill_grace_s=0.5)  # type: ignore[attr-defined]
    impatient = Launcher(QemuDriver(patience), launcher.config)
    async with sandboxes.placed(8, "hung") as placement:
        async with agent_client(placement.slot) as agent:
            vm = await impatient.restore(placement, template.snapshot(), **sandboxes.machine, agent=agent)
        os.kill(vm.pid, signal.SIGSTOP)  # QEMU can no longer answer its monitor, nor SIGTERM
        t0 = time.monotonic()
        await vm.destroy()
        assert time.monotonic() - t0 < 5
        assert not vm.alive()
        assert processes_using(placement.run_dir.parent) == []


async def test_a_cancelled_restore_leaves_no_vm(
    sandboxes: Sandboxes, launcher: Launcher, template: Template
) -> None:
    """Cancelled at any moment, a launch either returned a VM or left no VMM process (the RAM file and the
    disk are the caller's: the host runtime holds them in its ledger before the launch)."""
    cancelled = 0
    for i, delay in enumerate((0.0, 0.02, 0.06, 0.12, 0.2, 0.3)):
        async with sandboxes.placed(11, f"cancelled-{i}") as placement:
            async with agent_client(placement.slot) as agent:
                with anyio.move_on_after(delay) as scope:
                    vm = await launcher.restore(
                        placement, template.snapshot(), **sandboxes.machine, agent=agent
                    )
            if scope.cancelled_caught:
                cancelled += 1
            else:
                await vm.destroy()
            assert processes_using(placement.run_dir.parent) == [], f"QEMU left after a cancel at {delay} s"
    assert cancelled >= 3
