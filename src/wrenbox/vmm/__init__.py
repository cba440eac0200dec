"""Virtual machine monitors: the driver interface (:mod:`wrenbox.vmm.base`) and its implementations,
:mod:`wrenbox.vmm.qemu` and, for KVM hosts, :mod:`wrenbox.vmm.firecracker`.

Owns the VMM processes and their own files; knows nothing of network slots, disks' origins or templates
(whatever a VM uses is named in its :class:`~wrenbox.vmm.base.VmConfig` by the caller). The host probe
names the driver the product runs; :func:`driver_for` builds it, the way :func:`wrenbox.rootfs.backend_for`
builds the disk backend::

    driver = driver_for(caps.vmm.name, caps)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from wrenbox.errors import InvalidArgument, Unsupported
from wrenbox.vmm.base import Driver
from wrenbox.vmm.firecracker import FirecrackerConfig, FirecrackerDriver
from wrenbox.vmm.qemu import QemuConfig, QemuDriver

if TYPE_CHECKING:
    from wrenbox.probe import HostCapabilities

__all__ = ["DRIVERS", "driver_for"]

DRIVERS: dict[str, Callable[[HostCapabilities], Driver]] = {
    QemuDriver.name: lambda caps: QemuDriver(QemuConfig.from_host(caps)),
    FirecrackerDriver.name: lambda caps: FirecrackerDriver(FirecrackerConfig.from_host(caps)),
}


def driver_for(name: str, caps: HostCapabilities) -> Driver:
    """The driver called ``name``, configured for this host (InvalidArgument for an unknown name,
    Unsupported when the probe found no VMM at all)."""
    if name == "none":
        raise Unsupported(f"this host has no usable VMM: {caps.vmm.why}")
    make = DRIVERS.get(name)
    if make is None:
        raise InvalidArgument(f"unknown VMM driver {name!r}; expected one of {', '.join(DRIVERS)}")
    return make(caps)
