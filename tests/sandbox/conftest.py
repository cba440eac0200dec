"""Real sandboxes through the real manager (the stack under ``wrenbox serve``): QEMU under TCG, network
slots, qcow2 disks, compact memory snapshots, SQLite.

One data directory per session (short, under /var/tmp, because unix socket paths are limited to 108
bytes), sharing the machine's cached guest image and host probe; the ``minimal`` template is built in it
by the first test that needs it. ``manager`` opens a manager per test and, whatever happened, destroys
every sandbox and derived template the test made. At the end of the session nothing may be left: no
QEMU process, namespace, link, RAM file or data directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from tests.support.images import scratch_data_dir
from tests.support.ranges import suite_ranges

from wrenbox.config import LimitsConfig, SandboxDefaults, Settings
from wrenbox.errors import InUse
from wrenbox.manager import Sandboxes, SandboxManager
from wrenbox.network import Network, NetworkConfig
from wrenbox.network.firewall import host_table_listing
from wrenbox.network.links import link_names
from wrenbox.network.netns import list_netns
from wrenbox.records import SandboxState
from wrenbox.runtime.sweep import our_processes
from wrenbox.service import Host, ensure_template, open_host, vmm_cgroups
from wrenbox.vmm.cgroups import CgroupConfig

GUEST_MEMORY_MB = 256
T = TypeVar("T")


def make_settings(root: Path, suite: str = "wbs", second_octet: int = 41, **overrides: object) -> Settings:
    """Settings for the test data dir ``root``, with a network prefix (``suite`` and a random tag) and a RAM
    dir of its own, and its suite's address ranges (:func:`suite_ranges`)."""
    tag = secrets.token_hex(2)
    fields: dict[str, object] = {
        "data_dir": root,
        "memory_dir": Path(f"/dev/shm/{suite}-{tag}"),
        "on_shutdown": "destroy",
        "network": NetworkConfig(prefix=f"{suite}{tag}", **suite_ranges(second_octet)),
        "defaults": SandboxDefaults(memory_mb=GUEST_MEMORY_MB, timeout_s=0),
        "limits": LimitsConfig(max_sandboxes=8, max_concurrent_starts=4),
    }
    return Settings(**{**fields, **overrides})  # type: ignore[arg-type]


def take_down(settings: Settings) -> dict[str, list[str]]:
    """What the data dir left on the host (:func:`leftovers`, for the caller to assert on), once the
    last host on it is closed; then its network and RAM dir are removed."""
    left = leftovers(settings)
    anyio.run(Network(settings.network).teardown)
    shutil.rmtree(settings.memory_dir, ignore_errors=True)
    return left


def policy(host: Host, **changes: Any) -> SandboxManager:
    """A manager over the same store and host runtime with other limits (a second policy, same mechanics)."""
    return SandboxManager(dataclasses.replace(host.manager.config, **changes), host.store, host.runtime)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*")) if directory.exists() else []


def leftovers(settings: Settings) -> dict[str, list[str]]:
    """Everything of this data dir still on the host (empty when all sandboxes are gone)."""
    prefix = settings.network.prefix
    found = {
        "processes": [str(p.pid) for p in our_processes([settings.data_dir])],
        "netns/links": [n for n in list_netns() + _link_names() if n.startswith(prefix)],
        "ram files": _names(settings.memory_dir),
        "sandbox dirs": _names(settings.sandboxes_dir),
        "disks": _names(settings.data_dir / "disks"),
        "cgroups": [n for n in _cgroup_names() if n.startswith(f"{prefix}-")],
        "loop devices": (loops := _loop_devices(settings.data_dir)),
        "dm devices": _dm_devices(loops),
    }
    return {k: v for k, v in found.items() if v}


def footprint(settings: Settings) -> dict[str, list[str]]:
    """:func:`leftovers` and the host's nftables table of this prefix (with a hash of its rules): what
    the data dir has on the host, to compare exactly before and after a test. The table stays once a
    host has set it up (it confines VMs a crash left running), so it is not a leftover."""
    found = leftovers(settings)
    listing = _off_loop(host_table_listing, settings.network)
    if listing is not None:
        found["host nft table"] = [
            f"{settings.network.prefix} {hashlib.sha256(listing.encode()).hexdigest()}"
        ]
    return found


def open_fds() -> list[str]:
    """What this test process has open (a manager opened and closed in it must close what it opened)."""
    return sorted(_readlink(fd) for fd in Path("/proc/self/fd").iterdir())


def _readlink(fd: Path) -> str:
    try:
        return str(fd.readlink())
    except FileNotFoundError:  # the listing's own descriptor, closed by now
        return "(closed)"


def _loop_devices(root: Path) -> list[str]:
    """Loop devices backed by a file in ``root``."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        if Path(backing.read_text().strip()).is_relative_to(root):
            found.append(backing.parent.parent.name)
    return sorted(found)


def _dm_devices(loops: list[str]) -> list[str]:
    """Device-mapper devices stacked (directly or through others) on ``loops``, by name."""
    ours = set(loops)
    dms = list(Path("/sys/block").glob("dm-*"))
    grew = True
    while grew:
        grew = False
        for dm in dms:
            if dm.name not in ours and {s.name for s in (dm / "slaves").iterdir()} & ours:
                ours.add(dm.name)
                grew = True
    return sorted((dm / "dm" / "name").read_text().strip() for dm in dms if dm.name in ours)


def _cgroup_names() -> list[str]:
    found = vmm_cgroups(CgroupConfig())
    return found[0].names() if found else []


def _link_names() -> list[str]:
    return _off_loop(link_names)


def _off_loop(fn: Callable[..., T], *args: object) -> T:
    # Netlink calls refuse to run on an event loop's thread, and async tests call leftovers() too.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    root = scratch_data_dir("wbs-")
    s = make_settings(root)
    yield s
    left = take_down(s)
    shutil.rmtree(root, ignore_errors=True)
    assert left == {}, f"the sandbox tests left things behind: {left}"


@pytest.fixture
async def host(settings: Settings) -> AsyncIterator[Host]:
    """The session's data dir, assembled (``host.manager`` is the face; the runtime is there for tests
    that look at it). Afterwards every sandbox is destroyed and every template but ``minimal`` deleted;
    one that cannot be (still in use, files astray) fails the test."""
    async with open_host(settings, reaper=False) as host:
        mgr = host.manager
        await ensure_template(mgr, settings)
        try:
            yield host
        finally:
            with anyio.CancelScope(shield=True):
                for rec in mgr.list():
                    await mgr.destroy(rec.id)
                await delete_templates(mgr)
        assert [r.id for r in mgr.list() if r.state is not SandboxState.DESTROYED] == []
        assert [t.name for t in mgr.templates()] == ["minimal"]
        assert sorted(p.name for p in settings.templates_dir.iterdir()) == ["minimal"]


@pytest.fixture
def manager(host: Host) -> SandboxManager:
    return host.manager


async def delete_templates(mgr: Sandboxes) -> None:
    """Delete every template but ``minimal`` that nothing uses (deleting one can free further ones:
    templates made from sandboxes of a deleted template's... hence the loop)."""
    while True:
        deleted = 0
        for t in mgr.templates():
            if t.name != "minimal":
                with contextlib.suppress(InUse):
                    await mgr.delete_template(t.name)
                    deleted += 1
        if not deleted:
            return
