"""A real sandbox's QEMU runs confined (security findings 2, 7, 8): its own unprivileged user, QEMU's
seccomp filter, no new privileges, an environment of PATH only, a root that shows none of the host's
files, a capped translation cache; and a guest that floods its serial console writes nothing on the host.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import anyio
import pytest

from wrenbox.config import Settings
from wrenbox.launch import LaunchConfig
from wrenbox.manager import CreateRequest, SandboxManager
from wrenbox.runtime.sweep import our_processes
from wrenbox.service import vmm_cgroups
from wrenbox.vmm.cgroups import CgroupConfig

from .conftest import GUEST_MEMORY_MB, leftovers

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.root]

JAIL = LaunchConfig()


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _allocated(path: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def uid_of(pid: int) -> int:
    return int(_status(pid)["Uid"].split()[0])


def _names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def _check_the_jail(pid: int, settings: Settings, sandbox_id: str) -> None:
    assert Path(f"/proc/{pid}/environ").read_bytes() == b"PATH=/usr/bin:/bin\0"
    # Its root: programs, a few devices, its own files. The data dir's secrets do not exist there.
    root = Path(f"/proc/{pid}/root")
    assert _names(root) == ["bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "usr", "var"]
    assert _names(root / "dev") == ["full", "null", "random", "urandom", "zero"]
    assert _names(root / "etc") == ["ld.so.cache"]
    inside = root / str(settings.data_dir).lstrip("/")
    assert not (inside / "state.db").exists()
    assert not (inside / "templates" / "minimal" / "memory").exists()
    assert _names(inside / "sandboxes") == [sandbox_id]
    assert (inside / "sandboxes" / sandbox_id / "run" / "qmp.sock").exists()
    # Its /proc shows it no other user's processes (the manager's, other VMMs').
    mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    (proc,) = [m for m in mounts if m.split()[4] == "/proc"]
    assert "hidepid=invisible" in proc
    # On the host, as that user, it could not even enter the data dir; nor can any local user.
    assert (settings.data_dir.stat().st_mode & 0o077) == 0
    for who in ("nobody", str(uid_of(pid))):
        done = subprocess.run(
            ["setpriv", f"--reuid={who}", "--regid=65534", "--clear-groups", "cat", str(settings.state_db)],
            capture_output=True,
            check=False,
        )
        assert done.returncode != 0
        assert b"Permission denied" in done.stderr


def _check_the_cgroups(pid: int, settings: Settings) -> None:
    """Its cgroup: the slot's, under ours, sized from the sandbox (guest RAM + QEMU's allowance), on
    whichever hierarchy the host has (the product runs without where it has none it may use)."""
    found = vmm_cgroups(CgroupConfig())
    if found is None:
        return
    tree = found[0]
    (name,) = [n for n in tree.names() if n.startswith(f"{settings.network.prefix}-")]
    cgroup = tree.get(name)
    assert pid in cgroup.pids()
    limit = (GUEST_MEMORY_MB + CgroupConfig().memory_overhead_mib) << 20
    memory_file, pids_file = (
        ("memory.max", "pids.max") if tree.version == 2 else ("memory.limit_in_bytes", "pids.max")
    )
    assert int((cgroup.controllers["memory"] / memory_file).read_text()) == limit
    assert int((cgroup.controllers["pids"] / pids_file).read_text()) == CgroupConfig().pids_max


async def test_the_vmm_runs_as_its_own_user_in_a_root_of_its_own(
    manager: SandboxManager, settings: Settings
) -> None:
    sb = await manager.create(CreateRequest())
    (vmm,) = our_processes([settings.data_dir])
    status = _status(vmm.pid)
    uid = int(status["Uid"].split()[0])
    assert JAIL.vmm_uid_base is not None
    assert uid > JAIL.vmm_uid_base
    assert status["Uid"].split() == [str(uid)] * 4  # real, effective, saved, filesystem
    assert status["Gid"].split() == [str(JAIL.vmm_gid)] * 4
    assert status["Groups"] == ""
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # QEMU's -sandbox filter
    assert status["CapEff"] == "0000000000000000"
    _check_the_jail(vmm.pid, settings, sb.id)
    _check_the_cgroups(vmm.pid, settings)

    # And it still works: commands, pause with memory, resume.
    assert (await manager.exec(sb.id, "echo ok")).stdout == b"ok\n"
    await manager.pause(sb.id)
    await manager.resume(sb.id)
    assert (await manager.exec(sb.id, "echo back")).stdout == b"back\n"
    await manager.destroy(sb.id)
    assert leftovers(settings) == {}


async def test_a_console_flood_costs_the_host_no_disk(manager: SandboxManager, settings: Settings) -> None:
    sb = await manager.create(CreateRequest())
    before = _allocated(settings.data_dir)
    flood = "head -c 8000000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo done"
    result = await manager.exec(sb.id, ["sh", "-c", flood], user="root", timeout=300)
    assert result.stdout == b"done\n"
    grown = _allocated(settings.data_dir) - before
    assert grown < 2 * 1024 * 1024, f"an 8 MB console flood grew the data dir by {grown} bytes"
    assert (await manager.exec(sb.id, "echo alive")).stdout == b"alive\n"
    await manager.destroy(sb.id)


def _modes(tree: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(tree)): (p.lstat().st_uid, p.lstat().st_mode & 0o777) for p in tree.rglob("*")}


async def test_a_template_made_from_a_sandbox_is_roots_alone(
    manager: SandboxManager, settings: Settings
) -> None:
    """It holds a tenant's memory and disk: owned by root, readable by root (the root disk also by the
    VMMs' group, which only jailed VMMs hold), whatever the builder VM owned."""
    sb = await manager.create(CreateRequest())
    template = await manager.snapshot(sb.id)
    child = await manager.create(CreateRequest(template=template.name))  # its VMM reads the root disk
    files = await anyio.to_thread.run_sync(_modes, settings.templates_dir / template.name)
    assert {name: owner for name, (owner, _) in files.items() if owner != 0} == {}
    loose = {
        name: oct(mode)
        for name, (_, mode) in files.items()
        if mode & 0o037 or (mode & 0o040 and name != "rootfs.ext4")
    }
    assert loose == {}
    await manager.destroy(child.id)
    await manager.destroy(sb.id)
