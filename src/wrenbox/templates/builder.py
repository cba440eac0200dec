"""Building a template from an image: boot it once, warm it up, snapshot it, flatten its disk, publish."""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import time
from collections.abc import Callable, Iterator

import anyio

from wrenbox.images import Image
from wrenbox.launch import Launcher, Placement, agent_client
from wrenbox.network import Network, NetworkSlot
from wrenbox.rootfs import RootfsBackend
from wrenbox.templates.library import Draft, Template, TemplateLibrary

__all__ = ["TemplateBuilder"]

log = logging.getLogger(__name__)

# What every sandbox does first; done once before the snapshot, the agent's lazily imported modules and
# the guest's page cache are already in the template's memory.
WARM_UP = (["true"], ["/bin/sh", "-c", "true"], ["python3", "-c", "pass"])


class TemplateBuilder:
    """Builds templates into a :class:`TemplateLibrary`, each in a network slot of its own from the pool
    (the highest free one, out of the way of sandboxes, which take the lowest)."""

    def __init__(
        self, library: TemplateLibrary, *, launcher: Launcher, rootfs: RootfsBackend, network: Network
    ) -> None:
        self.library = library
        self.launcher = launcher
        self.rootfs = rootfs
        self.network = network

    async def build(
        self,
        name: str,
        image: Image,
        *,
        vcpus: int,
        memory_mib: int,
        disk_mib: int = 0,
        on_step: Callable[[str], None] | None = None,
    ) -> Template:
        """Boot ``image`` on a root disk of ``disk_mib`` (the image's size if that is larger; sparse, and
        the guest grows its filesystem to it at boot), wait for its agent, warm it up, snapshot it and
        publish the result as template ``name``. AlreadyExists if it exists; nothing is left on failure."""
        draft_of = self.library.draft(
            name, image, vcpus=vcpus, memory_mib=memory_mib, disk_format=str(self.rootfs.format)
        )
        async with draft_of as draft:
            step = _Stepper(draft.timings, on_step)
            slot = await self.network.take(highest=True)
            try:
                await self._build(
                    draft, image, slot, step, vcpus=vcpus, memory_mib=memory_mib, disk_mib=disk_mib
                )
            finally:
                with anyio.CancelScope(shield=True):
                    await self.network.give_back(slot)
            step.enter("publish")
        assert draft.template is not None
        log.info("built template %s in %.1f s: %s", name, sum(draft.timings.values()), draft.timings)
        return draft.template

    async def _build(
        self,
        draft: Draft,
        image: Image,
        slot: NetworkSlot,
        step: _Stepper,
        *,
        vcpus: int,
        memory_mib: int,
        disk_mib: int,
    ) -> None:
        with step("disk"):
            size = max(image.rootfs.stat().st_size, disk_mib << 20)
            disk = await self.rootfs.create(image.rootfs, f"template-build-{secrets.token_hex(4)}", size)
        try:
            placement = Placement(draft.path / "run", disk.drive(), slot, draft.memory)
            async with agent_client(slot) as agent:
                with step("boot"):  # to the agent's first answer
                    vm = await self.launcher.boot(
                        placement, image, vcpus=vcpus, memory_mib=memory_mib, agent=agent
                    )
                try:
                    with step("warm_up"):
                        # Every sandbox restored from the template starts with this agent: it takes the
                        # first /init only from the host, which alone knows the token (finding 12).
                        draft.agent_token = secrets.token_urlsafe(24)
                        await agent.init(access_token=draft.agent_token)
                        for argv in WARM_UP:
                            await agent.processes.exec(argv, timeout=self.launcher.config.boot_timeout_s)
                        await agent.warm_up()
                    with step("snapshot"):
                        await vm.snapshot(draft.snapshot_dir)
                finally:
                    with anyio.CancelScope(shield=True):
                        await vm.destroy()
            with step("flatten"):
                draft.rootfs_image = await self.rootfs.flatten(disk, draft.rootfs)
        finally:
            with anyio.CancelScope(shield=True):
                await self.rootfs.remove(disk)
                await anyio.to_thread.run_sync(shutil.rmtree, draft.path / "run", True)


class _Stepper:
    """Times named build steps into ``timings`` and reports each start to ``on_step``."""

    def __init__(self, timings: dict[str, float], on_step: Callable[[str], None] | None) -> None:
        self.timings = timings
        self.on_step = on_step

    def enter(self, name: str) -> None:
        if self.on_step is not None:
            self.on_step(name)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.enter(name)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.monotonic() - t0, 3)
