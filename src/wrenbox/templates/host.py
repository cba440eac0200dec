"""``wrenbox template build``: wire the template store to this host (probe, QEMU, disks, a network slot)."""

from __future__ import annotations

from collections.abc import Callable

from wrenbox.config import Settings
from wrenbox.errors import AlreadyExists, Unavailable
from wrenbox.images import Image, load_image
from wrenbox.names import validate_name
from wrenbox.network import Network, NetworkSlot
from wrenbox.probe import HostCapabilities
from wrenbox.rootfs import RootfsConfig, backend_for
from wrenbox.templates.store import Template, TemplateConfig, Templates
from wrenbox.vmm.qemu import QemuConfig, QemuDriver

__all__ = ["build_template", "host_templates"]


def host_templates(settings: Settings, caps: HostCapabilities, **config: object) -> Templates:
    """The template store of this host, with the VMM and disk backend the host probe chose."""
    disks = RootfsConfig.from_settings(settings)
    disks.disks_dir.mkdir(parents=True, exist_ok=True)
    return Templates(
        TemplateConfig.from_settings(settings, **config),
        driver=QemuDriver(QemuConfig.from_host(caps)),
        rootfs=backend_for(caps.rootfs.name, disks),
    )


async def build_template(
    settings: Settings,
    name: str,
    *,
    image: str | Image = "minimal",
    caps: HostCapabilities | None = None,
    network: Network | None = None,
    on_step: Callable[[str], None] | None = None,
    **config: object,
) -> Template:
    """Build template ``name`` from an image, in a network slot of its own that is removed afterwards.

    The slot is the highest free one, out of the way of sandboxes, which take the lowest.
    """
    validate_name(name, what="template name")
    if (settings.templates_dir / name).exists():  # before anything slow happens
        raise AlreadyExists(f"template {name!r} already exists; templates are immutable")
    templates = host_templates(settings, caps or HostCapabilities.probe(settings), **config)
    if isinstance(image, str):
        image = load_image(settings.images_dir, image)
    network = network or Network(settings.network)
    await network.setup()
    slot = await _free_slot(network)
    try:
        return await templates.build(name, image, slot, on_step=on_step)
    finally:
        await network.remove(slot)


async def _free_slot(network: Network) -> NetworkSlot:
    for index in range(network.config.capacity, 0, -1):
        slot = network.slot(index)
        try:
            await network.create(slot)
        except AlreadyExists:
            continue
        return slot
    raise Unavailable("no free network slot to build a template in")
