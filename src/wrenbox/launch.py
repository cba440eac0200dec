"""Starting VMs on this host: the one place a VM's configuration is put together, and where a started
VM is waited on until its guest agent answers.

A VM is *placed* first (:class:`Placement`: its run directory, root disk, network slot and RAM file, all
owned by the caller), then :class:`Launcher` boots it from an image, restores it from a snapshot, or
adopts it after a restart. All three build their :class:`~wrenbox.vmm.base.VmConfig` with
:meth:`Placement.vm_config`, so a template build, a cold create, a create from a template, a resume and a
disk-only resume configure their VMs alike::

    placement = Placement(run_dir, disk.drive(), slot, ram_file)
    agent = agent_client(slot, token)                  # the caller's, kept for the VM's life
    vm = await launcher.restore(placement, snapshot, vcpus=1, memory_mib=512, agent=agent)
    await agent.init(...)                               # clock, CRNG, token, env: the caller's to say

A launch returns once the agent answered ``/health``; if it never does, the VM is destroyed again and
the error carries the end of its console.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from wrenbox import faults
from wrenbox.envd import AsyncEnvdClient, EnvdConfig
from wrenbox.envd.endpoint import ENVD_PORT
from wrenbox.errors import NotFound, Timeout, Unavailable
from wrenbox.images import Image, guest_kernel_args
from wrenbox.network import GATEWAY_IP, GUEST_IP, GUEST_NETWORK, NetworkSlot
from wrenbox.pids import ProcessRef
from wrenbox.vmm.base import Drive, Driver, Kernel, Machine, MemoryFile, Nic, Snapshot, Vm, VmConfig
from wrenbox.vmm.cgroups import Cgroup, CgroupConfig, CgroupLimits, CgroupTree
from wrenbox.vmm.jail import Confinement

__all__ = ["LaunchConfig", "Launcher", "Placement", "agent_client"]


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one VM lives on this host. All of it belongs to the caller, who removes it after the VM.

    ``memory`` is the VM's own RAM file (on tmpfs by default: no disk writeback while it runs): a copy of
    a template's RAM or a memory snapshot materialised for a restore, nothing yet for a boot.
    """

    run_dir: Path
    disk: Drive
    slot: NetworkSlot
    memory: Path

    def vm_config(
        self,
        *,
        vcpus: int,
        memory_mib: int,
        kernel: Kernel | None = None,
        confinement: Confinement | None = None,
    ) -> VmConfig:
        """The VM's configuration: this placement, a machine of ``vcpus`` and ``memory_mib`` with the
        root disk and the slot's NIC, a ``kernel`` for a cold boot, and whom the VMM runs as."""
        nic = Nic(mac=self.slot.guest_mac, tap=self.slot.tap)
        machine = Machine(vcpus=vcpus, memory_mib=memory_mib, drives=(self.disk,), nics=(nic,))
        return VmConfig(
            machine=machine,
            memory=MemoryFile(self.memory),
            run_dir=self.run_dir,
            kernel=kernel,
            netns=self.slot.netns_path,
            confinement=confinement,
        )


def agent_client(slot: NetworkSlot, token: str | None = None) -> AsyncEnvdClient:
    """A client of the guest agent of the VM in ``slot`` (reached at the slot's host address)."""
    return AsyncEnvdClient(EnvdConfig(base_url=f"http://{slot.host_ip}:{ENVD_PORT}", access_token=token))


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    """``vmm_uid_base``: VMMs that can be confined run as ``vmm_uid_base + slot index`` in group
    ``vmm_gid`` (:mod:`wrenbox.vmm.jail`); None runs them as root, unconfined."""

    boot_timeout_s: float = 180.0  # cold boot to agent under TCG is ~5 s on a quiet host
    ready_timeout_s: float = 30.0  # restore to agent
    poll_interval_s: float = 0.01
    vmm_uid_base: int | None = 2_000_000_000
    vmm_gid: int = 2_000_000_000
    dns_servers: tuple[str, ...] = ("8.8.8.8", "8.8.4.4")  # what a cold-booted guest resolves with


class Launcher:
    """Boots, restores and adopts VMs with one VMM driver. With ``cgroups`` (a tree and its settings),
    each confined VMM runs in a cgroup of its slot, sized from its machine: one per slot, so a slot's
    next VM reuses it and nothing accumulates."""

    def __init__(
        self,
        driver: Driver,
        config: LaunchConfig | None = None,
        *,
        cgroups: tuple[CgroupTree, CgroupConfig] | None = None,
    ) -> None:
        self.driver = driver
        self.config = config or LaunchConfig()
        self.cgroups = cgroups

    async def boot(
        self, placement: Placement, image: Image, *, vcpus: int, memory_mib: int, agent: AsyncEnvdClient
    ) -> Vm:
        """Cold-boot ``image`` into ``placement``; returns once ``agent`` answers (no ``/init``)."""
        vm = await self.driver.boot(
            self._vm_config(placement, vcpus=vcpus, memory_mib=memory_mib, kernel=self.kernel(image))
        )
        await self._ready(vm, agent, self.config.boot_timeout_s)
        return vm

    def kernel(self, image: Image) -> Kernel:
        """``image``'s kernel with the command line a sandbox boots it with (its address, gateway, DNS)."""
        args = guest_kernel_args(
            image.manifest.kernel_args,
            ip=f"{GUEST_IP}/{GUEST_NETWORK.prefixlen}",
            gateway=str(GATEWAY_IP),
            dns=self.config.dns_servers,
        )
        return Kernel(image.kernel, image.initramfs, " ".join(args))

    async def restore(
        self,
        placement: Placement,
        snapshot: Snapshot,
        *,
        vcpus: int,
        memory_mib: int,
        agent: AsyncEnvdClient,
    ) -> Vm:
        """Restore ``snapshot`` into ``placement`` with guest RAM from ``placement.memory`` (which the
        caller prepared); returns once ``agent`` answers (no ``/init``)."""
        vm = await self.driver.restore(
            self._vm_config(placement, vcpus=vcpus, memory_mib=memory_mib), snapshot
        )
        await self._ready(vm, agent, self.config.ready_timeout_s)
        return vm

    def adopt(self, placement: Placement, process: ProcessRef, *, vcpus: int, memory_mib: int) -> Vm:
        """A handle on a VM a previous wrenbox process launched into ``placement`` (still alive)."""
        config = placement.vm_config(vcpus=vcpus, memory_mib=memory_mib)
        cgroup = self._cgroup(placement, None)
        return self.driver.adopt(replace(config, confinement=self.confinement(placement, cgroup)), process)

    @property
    def confining(self) -> bool:
        """VMMs run confined: confining is on and the driver can."""
        return self.config.vmm_uid_base is not None and self.driver.confines

    def confinement(self, placement: Placement, cgroup: Cgroup | None = None) -> Confinement | None:
        """Whom the VMM in ``placement`` runs as (None: root, where confining is off or unsupported)."""
        if not self.confining:
            return None
        assert self.config.vmm_uid_base is not None
        uid = self.config.vmm_uid_base + placement.slot.index
        return Confinement(uid=uid, gid=self.config.vmm_gid, cgroup=cgroup)

    def reclaim_cgroups(self, prefix: str, in_use: Iterable[NetworkSlot]) -> list[str]:
        """Remove the slot cgroups of network ``prefix`` that no VM uses (the leak sweep; blocking)."""
        if self.cgroups is None:
            return []
        tree = self.cgroups[0]
        keep = {slot.netns for slot in in_use}
        return tree.reclaim(keep | {n for n in tree.names() if not n.startswith(f"{prefix}-")})

    def _cgroup(self, placement: Placement, machine: tuple[int, int] | None) -> Cgroup | None:
        """The slot's cgroup: made (or reused) and sized for a ``(vcpus, memory_mib)`` machine, or, for
        an adopted VM (``machine`` None), the one it runs in if it exists."""
        if self.cgroups is None or not self.confining:
            return None
        tree, settings = self.cgroups
        if machine is None:
            try:
                return tree.get(placement.slot.netns)
            except NotFound:
                return None
        vcpus, memory_mib = machine
        limits = CgroupLimits.for_sandbox(vcpus=vcpus, memory_mib=memory_mib, config=settings)
        return tree.create(placement.slot.netns, limits)

    def _vm_config(self, placement: Placement, *, vcpus: int, memory_mib: int, **more: Any) -> VmConfig:
        cgroup = self._cgroup(placement, (vcpus, memory_mib))
        confinement = self.confinement(placement, cgroup)
        return placement.vm_config(vcpus=vcpus, memory_mib=memory_mib, confinement=confinement, **more)

    async def wait_for_agent(self, vm: Vm, agent: AsyncEnvdClient, timeout: float | None = None) -> None:
        """Wait until ``agent`` answers; Unavailable if the VM exits first, Timeout after ``timeout``
        (the restore deadline by default). Errors carry the end of the VM's console."""
        timeout = self.config.ready_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                await agent.wait_healthy(min(1.0, timeout), interval=self.config.poll_interval_s)
                return
            except Timeout:
                if not vm.alive():
                    raise Unavailable(
                        f"VM {vm.pid} exited before its agent answered; console:\n{await vm.console_tail()}"
                    ) from None
                if time.monotonic() > deadline:
                    raise Timeout(
                        f"the agent of VM {vm.pid} did not answer within {timeout:g} s; "
                        f"console:\n{await vm.console_tail()}"
                    ) from None

    async def _ready(self, vm: Vm, agent: AsyncEnvdClient, timeout: float) -> None:
        try:
            faults.point("launch.agent")
            await self.wait_for_agent(vm, agent, timeout)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await vm.destroy()
            raise
