"""What the launcher puts together for a VM (no VM: a driver that records the configuration it is given)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from wrenbox.images import Image
from wrenbox.launch import LaunchConfig, Launcher, Placement, agent_client
from wrenbox.network import NetworkConfig
from wrenbox.vmm.base import Drive, Driver, Machine, Snapshot, Vm, VmConfig


class Stop(Exception):
    pass


class Recording(Driver):
    name = "recording"
    confines = True

    def __init__(self) -> None:
        self.configs: list[VmConfig] = []

    async def version(self) -> str:
        return "0"

    def pinned(self, machine: Machine) -> dict[str, Any]:
        return {}

    async def boot(self, config: VmConfig) -> Vm:
        self.configs.append(config)
        raise Stop

    async def restore(self, config: VmConfig, snapshot: Snapshot) -> Vm:
        raise NotImplementedError

    def adopt(self, config: VmConfig, process: Any) -> Vm:
        raise NotImplementedError


def _boot(launcher: Launcher, image: Image, placement: Placement) -> None:
    async def go() -> None:
        async with agent_client(placement.slot) as agent:
            with pytest.raises(Stop):
                await launcher.boot(placement, image, vcpus=1, memory_mib=256, agent=agent)

    anyio.run(go)


def test_a_cold_boot_gets_the_configured_resolvers_and_its_slots_user(
    guest_image: Image, tmp_path: Path
) -> None:
    slot = NetworkConfig().slot(7)
    placement = Placement(tmp_path / "run", Drive(tmp_path / "disk"), slot, tmp_path / "ram")
    driver = Recording()
    launcher = Launcher(driver, LaunchConfig(dns_servers=("9.9.9.9",), vmm_uid_base=3_000_000_000))
    _boot(launcher, guest_image, placement)
    (config,) = driver.configs
    assert config.kernel is not None
    assert "9.9.9.9" in config.kernel.cmdline
    assert "8.8.8.8" not in config.kernel.cmdline
    assert config.confinement is not None
    assert config.confinement.uid == 3_000_000_007  # the slot's own user

    unconfined = Launcher(driver, LaunchConfig(vmm_uid_base=None))
    _boot(unconfined, guest_image, placement)
    assert driver.configs[-1].confinement is None
