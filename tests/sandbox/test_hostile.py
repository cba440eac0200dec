"""Hostile guests: a sandbox attacking its own VM (fork bomb, memory hog, disk filler, output flood) while a
neighbour sandbox works. What must hold whatever the timing (the slowdown is measured in bench/hostile.py):
the neighbour's commands answer, correctly; the attacker's VMM stays inside its cgroup's memory limit and
is not killed by it; the attacker can be destroyed and leaves nothing; a flood of output costs the host
process bounded memory whoever reads it; a guest filling its root disk cannot grow the host's file past
the disk's size.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from wrenbox.config import Settings
from wrenbox.envd.models import Stdout
from wrenbox.manager import CreateRequest, SandboxManager
from wrenbox.rootfs import Disk
from wrenbox.runtime.base import Resource
from wrenbox.service import vmm_cgroups
from wrenbox.vmm.cgroups import Cgroup, CgroupConfig

from .conftest import leftovers
from .guest import run

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.root]

ATTACK_S = 5.0
ATTACKS = {
    "fork_bomb": "b() { b | b & }; b",
    # Touches every page it gets (b"\1" * n writes them), restarted whenever the guest's OOM killer ends it.
    "memory_hog": "while true; do python3 -c 'x = []\nwhile True: x.append(b\"\\1\" * (8 << 20))'; done",
    "disk_filler": "while true; do dd if=/dev/zero of=/var/fill bs=1M count=4096 oflag=direct; done",
}
MIB = 1 << 20
CAP = 256 * 1024  # what exec keeps of a flood, in the test


def vmm_pid(mgr: SandboxManager, sandbox_id: str) -> int:
    return int(mgr.get(sandbox_id).resources[Resource.VM]["pid"])


def vmm_group(pid: int) -> Cgroup | None:
    """The cgroup the VMM runs in (None where the host confines VMMs without cgroups)."""
    found = vmm_cgroups(CgroupConfig())
    return found[0].holding(pid) if found else None


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def echo_round_trips(mgr: SandboxManager, sandbox_id: str, seconds: float) -> int:
    """Echo fresh words for ``seconds``; each must come back exactly. How many did."""
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or done < 2:
        word = secrets.token_hex(4)
        assert await run(mgr, sandbox_id, f"echo {word}") == f"{word}\n"
        done += 1
    return done


Hold = Callable[[], bool]


def busy_vcpu(pid: int, disk: Disk, settings: Settings) -> Hold:
    """A fork bomb shows on the host as a vCPU that never idles: 2 s of the VMM's CPU time."""
    start = cpu_seconds(pid)
    return lambda: cpu_seconds(pid) - start > 2.0


def guest_ram_touched(pid: int, disk: Disk, settings: Settings) -> Hold:
    """A memory hog has touched (nearly) all of guest RAM: the VMM's RSS holds it."""
    return lambda: rss_bytes(pid) > settings.defaults.memory_mb * MIB * 3 // 4


def disk_growing(pid: int, disk: Disk, settings: Settings) -> Hold:
    """A disk filler's zeros reach the host's file: 64 MiB more allocated."""
    start = disk.store.stat().st_blocks * 512
    return lambda: disk.store.stat().st_blocks * 512 - start > 64 * MIB


HOLD: dict[str, Callable[[int, Disk, Settings], Hold]] = {
    "fork_bomb": busy_vcpu,
    "memory_hog": guest_ram_touched,
    "disk_filler": disk_growing,
}


async def wait_until(predicate: Hold, message: str, timeout: float = 180.0) -> None:
    """Poll ``predicate`` until true; a generous deadline only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await anyio.sleep(0.25)
    raise AssertionError(message)


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_a_neighbour_works_through_an_attack_and_the_attacker_stays_in_its_limits(
    manager: SandboxManager, settings: Settings, attack: str
) -> None:
    neighbour = await manager.create(CreateRequest())
    attacker = await manager.create(CreateRequest())
    pid = vmm_pid(manager, attacker.id)
    group = vmm_group(pid)
    disk = Disk.model_validate(manager.get(attacker.id).resources[Resource.DISK])
    took_hold = HOLD[attack](pid, disk, settings)
    async with manager.use(attacker.id) as envd:
        await envd.processes.start(ATTACKS[attack], user="root", tag="attack")
    await wait_until(took_hold, f"the {attack} never took hold")

    peak = 0
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss_bytes(pid))
                await anyio.sleep(0.2)

        tg.start_soon(watch)
        assert await echo_round_trips(manager, neighbour.id, ATTACK_S) >= 2
        tg.cancel_scope.cancel()

    assert alive(pid), "the attacker's VMM died (its own limit killed it?)"
    if group is not None:
        limit = group.memory_limit_bytes()
        assert limit == (settings.defaults.memory_mb + CgroupConfig().memory_overhead_mib) * MIB
        assert 0 < peak <= limit, f"the attacker's QEMU reached {peak >> 20} MiB, over {limit >> 20}"
        assert group.oom_kills() == 0  # sized for a full guest: an attack inside is not the VMM's death

    await manager.destroy(attacker.id)
    assert not alive(pid)
    assert await run(manager, neighbour.id, "echo still") == "still\n"
    await manager.destroy(neighbour.id)
    assert leftovers(settings) == {}


async def test_an_output_flood_costs_the_host_bounded_memory(
    manager: SandboxManager, settings: Settings
) -> None:
    """``yes`` of 4 KiB lines: one client streams it (and keeps receiving), another is attached and never
    reads, and a third collects it with ``exec`` (which keeps at most ``output_cap`` of it). The host
    process's memory does not follow the flood: what is not read stays in the guest (the agent's
    back-pressure) or in socket buffers. (What a guest that ignores the agent's rules can do to the
    server's proxy: tests/api/test_flood.py.)"""
    neighbour = await manager.create(CreateRequest())
    attacker = await manager.create(CreateRequest())
    flood = "yes " + "x" * 4095
    received = 0
    async with manager.use(attacker.id) as envd:
        pid = await envd.processes.start(flood, tag="flood")
    before = rss_bytes_self()
    peak = before
    async with manager.use(attacker.id) as envd, envd.processes.connect(pid) as idle:
        assert idle.pid == pid  # attached, never read
        async with envd.processes.connect(pid) as stream:
            deadline = time.monotonic() + ATTACK_S
            async for event in stream:
                if isinstance(event, Stdout):
                    received += len(event.data)
                    peak = max(peak, rss_bytes_self())
                if time.monotonic() > deadline:
                    break
        assert await echo_round_trips(manager, neighbour.id, 1.0) >= 2
        capped = await envd.processes.exec(f"timeout 3 {flood}", output_cap=CAP, timeout=120)
        peak = max(peak, rss_bytes_self())
    assert capped.exit_code == 124  # ended by its timeout, not cut short by the cap
    assert len(capped.stdout) == CAP
    assert capped.stdout_truncated
    grown = peak - before
    assert received > 4 * MIB, f"the streaming client got only {received} bytes"
    assert grown < 64 * MIB, f"{received >> 20} MiB of output grew the host process by {grown >> 20} MiB"
    await manager.destroy(attacker.id)
    assert await run(manager, neighbour.id, "echo still") == "still\n"
    await manager.destroy(neighbour.id)
    assert leftovers(settings) == {}


def rss_bytes_self() -> int:
    return rss_bytes(os.getpid())


DISK_MB = 512
# The guest's root device (from the root's device number) and its size; zeros over its last 64 MiB to its
# end and on ("no space": the file system covers the whole device, so it ends there); one more MiB 64
# MiB past the end (the kernel refuses even to seek there).
RAW_FILL = """
dev=/dev/$(sed -n 's/^DEVNAME=//p' /sys/dev/block/$(stat -c '%Hd:%Ld' /)/uevent)
size=$(blockdev --getsize64 "$dev")
echo "$size"
dd if=/dev/zero of="$dev" bs=1M seek=$((size / 1048576 - 64)) oflag=direct 2>&1
echo --
dd if=/dev/zero of="$dev" bs=1M count=1 seek=$((size / 1048576 + 64)) oflag=direct 2>&1
sync
"""


async def test_a_guest_filling_its_disk_cannot_grow_the_hosts_file_past_its_size(
    manager: SandboxManager, settings: Settings
) -> None:
    template = await manager.build_template(f"small-disk-{secrets.token_hex(2)}", disk_mb=DISK_MB)
    neighbour = await manager.create(CreateRequest())
    filler = await manager.create(CreateRequest(template=template.name))
    disk = Disk.model_validate(manager.get(filler.id).resources[Resource.DISK])
    assert disk.size == DISK_MB * MIB
    # Zeros with direct I/O (nothing for QEMU to skip), as root (no reserved blocks), until the disk is full.
    fill = "dd if=/dev/zero of=/var/fill bs=1M oflag=direct 2>&1; sync; df -k / | tail -1"
    result = await manager.exec(filler.id, ["sh", "-c", fill], user="root", timeout=600)
    assert b"No space left on device" in result.stdout, result.stdout
    assert result.stdout.split()[-2] == b"100%", result.stdout  # df's Use% of /: full
    grown_to = _on_host(disk)
    # Then the raw device itself: whatever lies past the file system, to the end, and past the end.
    raw = await manager.exec(filler.id, ["sh", "-c", RAW_FILL], user="root", timeout=600)
    to_end, past_end = raw.stdout.split(b"\n--\n")
    assert int(to_end.split()[0]) == disk.size  # the guest sees the disk it was given
    assert b"No space left on device" in to_end, raw.stdout
    assert b"64+0 records out" in to_end, raw.stdout
    assert b"0+0 records out" in past_end, raw.stdout
    overhead = 16 * MIB  # qcow2's header, L1/L2 and refcount tables for 512 MiB are well under this
    assert grown_to <= disk.size + overhead, f"the host file holds {grown_to} bytes for a {disk.size} disk"
    assert grown_to <= _on_host(disk) <= disk.size + overhead
    assert await run(manager, neighbour.id, "echo fine") == "fine\n"
    await manager.destroy(filler.id)
    await manager.destroy(neighbour.id)
    await manager.delete_template(template.name)
    assert leftovers(settings) == {}


def _on_host(disk: Disk) -> int:
    """The most the host file behind the disk takes: its length or its allocated blocks."""
    st = disk.store.stat()
    return max(st.st_size, st.st_blocks * 512)
