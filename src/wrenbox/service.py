"""Assembling a working manager from settings: the one place that wires the parts together.

    async with open_manager(settings) as mgr:
        await ensure_template(mgr, settings)          # image + template, built once and cached
        sb = await mgr.create(CreateRequest())

``open_manager`` probes the host, installs the network's host table, opens the store, recovers whatever
a previous run left mid-operation, and runs the inactivity reaper. Leaving the block pauses (or
destroys, per ``on_shutdown``) every running sandbox, so a restart finds them paused.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio

from wrenbox.config import Settings
from wrenbox.errors import NotFound
from wrenbox.images import ImageConfig, build_image, load_image
from wrenbox.images.builder import StepEvent
from wrenbox.manager import ManagerConfig, SandboxManager
from wrenbox.manager.reaper import Reaper
from wrenbox.manager.store import Store
from wrenbox.network import Network
from wrenbox.probe import HostCapabilities
from wrenbox.records import TemplateRecord, TemplateState
from wrenbox.runtime.host import HostRuntime, RuntimeConfig
from wrenbox.templates import build_template, host_templates

__all__ = ["ensure_template", "manager_config", "open_manager", "runtime_config"]

log = logging.getLogger(__name__)


def manager_config(settings: Settings) -> ManagerConfig:
    return ManagerConfig(
        templates_dir=settings.templates_dir,
        max_sandboxes=settings.limits.max_sandboxes,
        max_concurrent_starts=settings.limits.max_concurrent_starts,
        exec_output_cap_bytes=settings.limits.exec_output_cap_bytes,
        default_template=settings.defaults.template,
        default_timeout_s=settings.defaults.timeout_s,
        on_shutdown=settings.on_shutdown,
    )


def runtime_config(settings: Settings) -> RuntimeConfig:
    return RuntimeConfig(
        sandboxes_dir=settings.sandboxes_dir,
        images_dir=settings.images_dir,
        memory_dir=settings.memory_dir,
        disk_size_mib=settings.defaults.disk_mb,
    )


@asynccontextmanager
async def open_manager(settings: Settings, *, reaper: bool = True) -> AsyncIterator[SandboxManager]:
    caps = await anyio.to_thread.run_sync(HostCapabilities.probe, settings)
    network = Network(settings.network)
    await network.setup()
    runtime = HostRuntime(runtime_config(settings), network=network, templates=host_templates(settings, caps))
    with Store(settings.state_db) as store:
        mgr = SandboxManager(manager_config(settings), store, runtime)
        await mgr.recover()
        async with anyio.create_task_group() as tg:
            if reaper:
                tg.start_soon(Reaper(mgr).run)
            try:
                yield mgr
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await mgr.shutdown()


async def ensure_template(
    mgr: SandboxManager,
    settings: Settings,
    name: str = "minimal",
    *,
    image: str = "minimal",
    on_step: Callable[[str], None] | None = None,
) -> TemplateRecord:
    """Template ``name`` ready to use: built from image ``image`` (built too if missing) on first use."""
    with contextlib.suppress(NotFound):
        found = mgr.store.get_template(name)
        if found.state is TemplateState.READY:
            return found
    try:
        load_image(settings.images_dir, image)
    except NotFound:
        if on_step:
            on_step(f"building image {image}")
        config = ImageConfig.from_settings(settings)

        def image_step(event: StepEvent) -> None:
            if on_step and event.status == "start":
                on_step(f"image {image}: {event.step}")

        await anyio.to_thread.run_sync(lambda: build_image(config, image, on_step=image_step))
    if on_step:
        on_step(f"building template {name}")
    runtime: HostRuntime = mgr.runtime  # type: ignore[assignment]
    tpl = await build_template(
        settings,
        name,
        image=image,
        network=runtime.network,
        on_step=None if on_step is None else lambda step: on_step(f"template {name}: {step}"),
    )
    record = TemplateRecord(
        name=name,
        kind="base",
        path=str(tpl.path),
        vcpus=tpl.manifest.vcpus,
        memory_mb=tpl.manifest.memory_mib,
        state=TemplateState.READY,
        source=image,
    )
    mgr.store.insert_template(record)
    return record
