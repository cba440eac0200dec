"""Copy-on-write root disks: one interface, a backend per host capability.

Owns every per-sandbox disk file and device (overlays, clones, CoW stores, loop and dm devices) and the
fingerprints that prove a base image unchanged.

============  ==================================================  ========================
backend       a disk is                                           needs
============  ==================================================  ========================
qcow2         a qcow2 overlay backed by the raw base image        QEMU (qemu-img)
reflink       a FICLONE of the base image (raw)                   xfs (reflink=1) or btrfs
dmsnapshot    a persistent dm-snapshot over a loop of the base    device-mapper (kernel)
copy          a sparse copy of the base image (raw)               nothing
============  ==================================================  ========================

The host probe (``wrenbox doctor``) picks the backend name; :func:`backend_for` builds it::

    rootfs = backend_for("reflink", RootfsConfig(disks_dir=data_dir / "disks", image_roots=(...)))
    disk = await rootfs.create(template_image, sandbox_id, size=4 << 30)
    ...                                       # boot the VM on disk.path (disk.format)
    disk = await rootfs.persist(disk)         # on pause; store disk.model_dump_json()
    disk = await rootfs.restore(disk)         # on resume
    image = await rootfs.flatten(disk, dest)  # a standalone raw image for a template
    await rootfs.remove(disk)

A persisted disk is restored by the backend that made it: ``backend_for(disk.backend, config)``.
"""

from __future__ import annotations

from wrenbox.command import arun
from wrenbox.errors import InvalidArgument
from wrenbox.rootfs.base import BaseImage, Disk, DiskFormat, Fingerprints, RootfsBackend, RootfsConfig, Runner
from wrenbox.rootfs.copy import CopyBackend
from wrenbox.rootfs.dmsnapshot import DmSnapshotBackend
from wrenbox.rootfs.qcow2 import Qcow2Backend
from wrenbox.rootfs.reflink import ReflinkBackend

__all__ = [
    "BACKENDS",
    "BaseImage",
    "CopyBackend",
    "Disk",
    "DiskFormat",
    "DmSnapshotBackend",
    "Fingerprints",
    "Qcow2Backend",
    "ReflinkBackend",
    "RootfsBackend",
    "RootfsConfig",
    "backend_for",
]

BACKENDS: dict[str, type[RootfsBackend]] = {
    cls.name: cls for cls in (Qcow2Backend, ReflinkBackend, DmSnapshotBackend, CopyBackend)
}


def backend_for(
    name: str,
    config: RootfsConfig,
    *,
    runner: Runner = arun,
    fingerprints: Fingerprints | None = None,
) -> RootfsBackend:
    """The backend called ``name`` (InvalidArgument for an unknown one)."""
    cls = BACKENDS.get(name)
    if cls is None:
        raise InvalidArgument(f"unknown rootfs backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return cls(config, runner=runner, fingerprints=fingerprints)
