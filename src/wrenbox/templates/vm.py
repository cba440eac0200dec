"""What building and starting templates do with a VM beyond the VMM: reach its agent, copy its RAM."""

from __future__ import annotations

import time
from pathlib import Path

from wrenbox.envd import AsyncEnvdClient, EnvdConfig
from wrenbox.envd.config import ENVD_PORT
from wrenbox.errors import Timeout, Unavailable
from wrenbox.network import NetworkSlot
from wrenbox.network.netns import NETNS_DIR
from wrenbox.vmm.base import Vm

__all__ = ["agent_client", "agent_ready", "netns_path"]


def netns_path(slot: NetworkSlot) -> Path:
    return NETNS_DIR / slot.netns


def agent_client(slot: NetworkSlot) -> AsyncEnvdClient:
    return AsyncEnvdClient(EnvdConfig(base_url=f"http://{slot.host_ip}:{ENVD_PORT}"))


async def agent_ready(
    vm: Vm, slot: NetworkSlot, *, timeout: float, init: bool = True, poll_interval: float = 0.01
) -> None:
    """Wait until the agent in ``vm`` (reached through ``slot``) answers, then, with ``init``, set its
    clock and reseed its CRNG (``POST /init``). Errors carry the end of the VM's console."""
    deadline = time.monotonic() + timeout
    async with agent_client(slot) as client:
        while True:
            try:
                await client.wait_healthy(min(1.0, timeout), interval=poll_interval)
                break
            except Timeout:
                if not vm.alive():
                    raise Unavailable(
                        f"VM {vm.pid} exited before its agent answered; console:\n{vm.console_tail()}"
                    ) from None
                if time.monotonic() > deadline:
                    raise Timeout(
                        f"the agent of VM {vm.pid} did not answer within {timeout:g} s; "
                        f"console:\n{vm.console_tail()}"
                    ) from None
        if init:
            await client.init()
