"""Real VMs from one template per session: the guest image (cached per machine), a network of our own,
the root disks and the VMM driver the host probe chose (qcow2 and QEMU under TCG here).

``template`` is built once per session (one cold boot) by :class:`TemplateBuilder`. ``sandboxes``
starts VMs from it in slots of its choosing and releases everything it made when the test ends,
whatever happened.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio
import pytest
from tests.support.images import image_settings

from wrenbox.config import SandboxDefaults, Settings
from wrenbox.envd import AsyncEnvdClient, ExecResult
from wrenbox.images import Image
from wrenbox.launch import Launcher, Placement, agent_client
from wrenbox.network import Network, NetworkConfig, NetworkSlot
from wrenbox.network.links import link_names
from wrenbox.network.netns import list_netns
from wrenbox.probe import HostCapabilities
from wrenbox.rootfs import Disk, RootfsBackend
from wrenbox.service import probe_host, rootfs_backend, vmm_cgroups, vmm_driver
from wrenbox.templates import Template, TemplateBuilder, TemplateLibrary
from wrenbox.vmm.base import Snapshot, Vm
from wrenbox.vmm.cgroups import CgroupConfig

GUEST_MEMORY_MIB = 256


def processes_using(path: Path) -> list[int]:
    """PIDs whose command line mentions ``path`` (QEMU names its RAM, disk and socket paths)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if bytes(path) in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def unreaped_children() -> list[int]:
    """Our children that have exited but were never reaped (zombies hold a PID each)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == b"Z" and int(fields[1]) == os.getpid():
                found.append(int(entry.name))
    return found


def network_leftovers(prefix: str) -> list[str]:
    return [n for n in list_netns() + link_names() if n.startswith(prefix)]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("wrenbox-data")
    yield path
    assert processes_using(path) == [], "a QEMU outlived the tests"
    assert unreaped_children() == [], "a QEMU was never reaped"


@pytest.fixture(scope="session")
def network() -> Iterator[Network]:
    suffix = secrets.randbelow(250)
    network = Network(
        NetworkConfig(
            prefix=f"wt{secrets.token_hex(2)}",
            host_range=f"10.252.{suffix}.0/27",
            transfer_range=f"10.252.{suffix}.32/27",
        )
    )
    anyio.run(network.setup)
    try:
        yield network
    finally:
        anyio.run(network.teardown)
    assert network_leftovers(network.config.prefix) == []


@pytest.fixture(scope="session")
def settings(data_dir: Path, guest_image: Image) -> Settings:
    """Settings for a data dir of our own, with the test image linked into its images dir."""
    settings = Settings(data_dir=data_dir, defaults=SandboxDefaults(memory_mb=GUEST_MEMORY_MIB))
    settings.images_dir.mkdir()
    (settings.images_dir / guest_image.name).symlink_to(guest_image.path)
    return settings


@pytest.fixture(scope="session")
def caps() -> HostCapabilities:
    """The host probe, cached with the test image (probing a fresh data dir would try KVM again)."""
    return probe_host(image_settings())


@pytest.fixture(scope="session")
def launcher(caps: HostCapabilities) -> Launcher:
    """VMs the way the product starts them: the driver the probe chose."""
    return Launcher(vmm_driver(caps), cgroups=vmm_cgroups(CgroupConfig()))


@pytest.fixture(scope="session")
def rootfs(settings: Settings, caps: HostCapabilities) -> RootfsBackend:
    return rootfs_backend(settings, caps)


@pytest.fixture(scope="session")
def library(settings: Settings) -> TemplateLibrary:
    return TemplateLibrary(settings.templates_dir)


@pytest.fixture(scope="session")
def builder(
    library: TemplateLibrary, launcher: Launcher, rootfs: RootfsBackend, network: Network
) -> TemplateBuilder:
    return TemplateBuilder(library, launcher=launcher, rootfs=rootfs, network=network)


@pytest.fixture(scope="session")
def template(builder: TemplateBuilder, guest_image: Image) -> Iterator[Template]:
    """Built once per session the way ``wrenbox template build`` builds one. After the session its RAM
    file must still hold what it held when built, whatever the clones did."""
    build = partial(builder.build, "minimal", guest_image, vcpus=1, memory_mib=GUEST_MEMORY_MIB)
    template = anyio.run(build)
    yield template
    assert sha256(template.memory) == template.manifest.memory_sha256, "a clone wrote into the template"


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class Sandbox:
    slot: NetworkSlot
    disk: Disk
    dir: Path
    vm: Vm
    agent: AsyncEnvdClient

    async def sh(self, script: str) -> str:
        """Run ``script`` with /bin/sh in the guest; its stdout (it must succeed)."""
        result: ExecResult = await self.agent.processes.exec(["/bin/sh", "-c", script], timeout=60)
        assert result.exit_code == 0, result
        return result.stdout.decode()


@dataclass
class Sandboxes:
    """Slots, disks and VMs made for one test, the way the host runtime makes them (a copy of the
    template's RAM, :class:`Launcher`, ``/init``); :meth:`close` releases all of them."""

    network: Network
    rootfs: RootfsBackend
    launcher: Launcher
    template: Template
    root: Path
    slots: dict[int, NetworkSlot] = field(default_factory=dict)
    made: list[Sandbox] = field(default_factory=list)

    async def slot(self, index: int) -> NetworkSlot:
        if index not in self.slots:
            slot = self.network.slot(index)
            await self.network.create(slot)
            self.slots[index] = slot
        return self.slots[index]

    async def remove_slot(self, index: int) -> None:
        await self.network.remove(self.slots.pop(index))

    def placement(self, directory: Path, disk: Disk, slot: NetworkSlot, run: str = "run") -> Placement:
        return Placement(directory / run, disk.drive(), slot, directory / "memory")

    @asynccontextmanager
    async def placed(self, index: int, name: str) -> AsyncIterator[Placement]:
        """A placement in slot ``index`` with a disk of its own and a copy of the template's RAM, for a
        test that launches into it itself; the disk and the directory go when the block ends."""
        slot = await self.slot(index)
        directory = self.root / name
        directory.mkdir(parents=True)
        disk = await self.rootfs.create(self.template.rootfs_image(), name)
        try:
            placement = self.placement(directory, disk, slot)
            self.template.copy_memory(placement.memory)
            yield placement
        finally:
            await self.rootfs.remove(disk)
            shutil.rmtree(directory)

    async def start(self, index: int) -> Sandbox:
        """A VM from the template in slot ``index``, with a disk and a RAM file of its own."""
        slot = await self.slot(index)
        name = f"sbx{index}-{secrets.token_hex(3)}"
        directory = self.root / name
        directory.mkdir()
        disk = await self.rootfs.create(self.template.rootfs_image(), name)
        placement = self.placement(directory, disk, slot)
        agent = agent_client(slot, self.template.manifest.agent_token)
        try:
            await anyio.to_thread.run_sync(self.template.copy_memory, placement.memory)
            vm = await self.launcher.restore(placement, self.template.snapshot(), **self.machine, agent=agent)
            await agent.init()
        except BaseException:
            await agent.aclose()
            await self.rootfs.remove(disk)
            raise
        sandbox = Sandbox(slot, disk, directory, vm, agent)
        self.made.append(sandbox)
        return sandbox

    @property
    def machine(self) -> dict[str, int]:
        return {"vcpus": self.template.manifest.vcpus, "memory_mib": self.template.manifest.memory_mib}

    async def pause(self, sandbox: Sandbox) -> Snapshot:
        """Snapshot the sandbox's VM into a new directory of its own and end the VM."""
        dest = sandbox.dir / f"pause-{secrets.token_hex(3)}"
        dest.mkdir()
        snapshot = await sandbox.vm.snapshot(dest)
        await sandbox.vm.destroy()
        await sandbox.agent.aclose()
        sandbox.disk = await self.rootfs.persist(sandbox.disk)
        return snapshot

    async def resume(self, sandbox: Sandbox, snapshot: Snapshot, index: int) -> None:
        """Restore a paused sandbox into slot ``index``, with RAM in its own file ``<dir>/memory``."""
        slot = await self.slot(index)
        sandbox.disk = await self.rootfs.restore(sandbox.disk)
        placement = self.placement(sandbox.dir, sandbox.disk, slot, run=f"run-{secrets.token_hex(3)}")
        sandbox.slot, sandbox.agent = slot, agent_client(slot, self.template.manifest.agent_token)
        sandbox.vm = await self.launcher.restore(placement, snapshot, **self.machine, agent=sandbox.agent)
        await sandbox.agent.init()

    async def close(self) -> None:
        for sandbox in reversed(self.made):
            await sandbox.agent.aclose()
            await sandbox.vm.destroy()
            await self.rootfs.remove(sandbox.disk)
            shutil.rmtree(sandbox.dir, ignore_errors=True)
        for index in list(self.slots):
            await self.remove_slot(index)


@pytest.fixture
async def sandboxes(
    network: Network, rootfs: RootfsBackend, launcher: Launcher, template: Template, data_dir: Path
) -> AsyncIterator[Sandboxes]:
    root = data_dir / "vms"
    root.mkdir(exist_ok=True)
    made = Sandboxes(network, rootfs, launcher, template, root)
    try:
        yield made
    finally:
        with anyio.CancelScope(shield=True):
            await made.close()
