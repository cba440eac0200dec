"""``HostCapabilities``: what this host can do, probed once and shared by every component.

Components never detect features on their own: the composition root (:mod:`wrenbox.service`) calls
``HostCapabilities.probe(data_dir, images_dir)`` and builds each component from the verdicts and the
chosen backends (the VMM driver with :func:`wrenbox.vmm.driver_for`, the disks with
:func:`wrenbox.rootfs.backend_for`), so what ``wrenbox doctor`` prints is what the product runs.

The probe result is cached in ``<data_dir>/host/`` for the current boot of this host
(``/proc/sys/kernel/random/boot_id``) and the installed QEMU; free disk and memory are always measured
fresh. ``refresh=True`` probes everything again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from wrenbox.command import PACKAGE_OF, require_tool
from wrenbox.errors import MissingTool
from wrenbox.images.initramfs import is_static_executable
from wrenbox.probe import probes
from wrenbox.probe.kvm import KvmVerdict, find_guest_kernel, probe_kvm
from wrenbox.probe.probes import Check, NetworkChecks

__all__ = ["Choice", "HostCapabilities", "Resources", "Tool"]

_FORMAT = 2  # 2: vmm is the driver's name (qemu, firecracker); the accelerator is `accel`
# Host programs and what wrenbox needs each for. Firecracker is not packaged in Debian.
_TOOLS: tuple[tuple[str, str, bool], ...] = (
    ("qemu-system-x86_64", "virtual machines (QEMU)", True),
    ("qemu-img", "qcow2 root disks", True),
    ("ip", "network slots", True),
    ("nft", "network slots (NAT, isolation)", True),
    ("debootstrap", "image build", True),
    ("apt-get", "image build (kernel download)", True),
    ("dpkg-deb", "image build (kernel unpack)", True),
    ("depmod", "image build (initramfs modules)", True),
    ("busybox", "image build (guest init)", True),
    ("mkfs.ext4", "image build (root filesystem)", True),
    ("e2fsck", "root disks", True),
    ("losetup", "loop devices (dm-snapshot, tests)", False),
    ("dmsetup", "dm-snapshot root disks", False),
    ("mkfs.xfs", "reflink test filesystems", False),
    ("mkfs.btrfs", "reflink test filesystems", False),
    ("zstd", "compressed exports", False),
    ("firecracker", "the Firecracker VMM (KVM hosts)", False),
)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Tool(_Model):
    name: str
    package: str
    needed_for: str
    required: bool
    path: str | None


class Choice(_Model):
    name: str
    why: str


class QemuInfo(_Model):
    path: str
    version: str


class Resources(_Model):
    disk_free_bytes: int  # in the data dir
    memory_total_bytes: int
    memory_available_bytes: int


class HostCapabilities(_Model):
    format: int = _FORMAT
    kernel_release: str
    boot_id: str
    data_dir: str
    qemu: QemuInfo | None
    firecracker: str | None
    kvm: KvmVerdict
    tsc_khz: int | None
    tsc_source: str
    device_mapper: Check
    reflink: Check
    data_dir_fs: str
    userfaultfd: Check
    network: NetworkChecks
    tools: list[Tool]
    vmm: Choice
    rootfs: Choice
    resources: Resources

    @property
    def accel(self) -> Literal["kvm", "tcg"]:
        """What QEMU should run with here."""
        return "kvm" if self.kvm.usable else "tcg"

    @property
    def missing_tools(self) -> list[Tool]:
        return [t for t in self.tools if t.required and t.path is None]

    @classmethod
    def probe(cls, data_dir: Path, images_dir: Path, *, refresh: bool = False) -> HostCapabilities:
        """Probe the host for a data dir (or reuse this boot's cached result); ``images_dir`` is where
        a guest kernel to prove KVM with may be found."""
        cache = data_dir / "host" / "capabilities.json"
        fingerprint = _fingerprint(data_dir, images_dir)
        resources = _resources(data_dir)
        cached = None if refresh else _load(cache, fingerprint)
        if cached is not None:
            return cached.model_copy(update={"resources": resources})
        caps = _probe(data_dir, images_dir, resources, refresh=refresh)
        _store(cache, fingerprint, caps)
        return caps


def _probe(data_dir: Path, images_dir: Path, resources: Resources, *, refresh: bool) -> HostCapabilities:
    with contextlib.suppress(OSError):
        data_dir.mkdir(parents=True, exist_ok=True)
    probe_dir = _existing(data_dir)
    tools = _tools()
    qemu_path = _path_of(tools, "qemu-system-x86_64")
    qemu = QemuInfo(path=qemu_path, version=probes.qemu_version(qemu_path)) if qemu_path else None
    kvm_cache = data_dir / "host" / "kvm.json"
    if refresh:
        kvm_cache.unlink(missing_ok=True)
    kvm = probe_kvm(
        qemu=qemu_path,
        qemu_version=qemu.version if qemu else "",
        images_dir=images_dir,
        cache_file=kvm_cache,
    )
    tsc_khz, tsc_source = probes.probe_tsc_khz()
    device_mapper = probes.probe_device_mapper()
    reflink = probes.probe_reflink(probe_dir)
    firecracker = _path_of(tools, "firecracker")
    vmm = _choose_vmm(qemu, firecracker, kvm)
    return HostCapabilities(
        kernel_release=os.uname().release,
        boot_id=_boot_id(),
        data_dir=str(data_dir),
        qemu=qemu,
        firecracker=firecracker,
        kvm=kvm,
        tsc_khz=tsc_khz,
        tsc_source=tsc_source,
        device_mapper=device_mapper,
        reflink=reflink,
        data_dir_fs=probes.filesystem_type(probe_dir),
        userfaultfd=probes.probe_userfaultfd(),
        network=probes.probe_network(),
        tools=tools,
        vmm=vmm,
        rootfs=_choose_rootfs(vmm.name == "firecracker", reflink, device_mapper, tools),
        resources=resources,
    )


def _choose_vmm(qemu: QemuInfo | None, firecracker: str | None, kvm: KvmVerdict) -> Choice:
    """The VMM driver the product runs (``name`` is a key of :data:`wrenbox.vmm.DRIVERS`).

    Firecracker is never chosen yet: its driver exists, but the host runtime's pause and resume assume
    QEMU's memory model (the RAM file is the memory), so sandboxes run on QEMU even where Firecracker
    could; saying so is part of the answer.
    """
    unused = (
        f"; {firecracker} is installed, but wrenbox does not run sandboxes on Firecracker yet"
        if firecracker
        else ""
    )
    if qemu and kvm.usable:
        return Choice(name="qemu", why=f"QEMU {qemu.version} with KVM: {kvm.detail}{unused}")
    if qemu:
        why = f"QEMU {qemu.version} emulating the CPU (TCG): KVM cannot run a Linux guest here (see kvm)"
        return Choice(name="qemu", why=why + unused)
    return Choice(name="none", why="no VMM: install the Debian package qemu-system-x86")


def _choose_rootfs(raw_disks: bool, reflink: Check, device_mapper: Check, tools: list[Tool]) -> Choice:
    if reflink.ok:
        return Choice(name="reflink", why=f"the data dir supports O(1) file clones: {reflink.detail}")
    if not raw_disks and _path_of(tools, "qemu-img"):
        return Choice(
            name="qcow2", why=f"no reflink ({reflink.detail}); QEMU qcow2 overlays on the base image"
        )
    if raw_disks and device_mapper.ok:
        return Choice(name="dmsnapshot", why=f"Firecracker needs raw disks; {device_mapper.detail}")
    return Choice(name="copy", why=f"no reflink ({reflink.detail}) and no overlay format: sparse full copies")


def _tools() -> list[Tool]:
    out = []
    for name, needed_for, required in _TOOLS:
        package = PACKAGE_OF.get(name, "not packaged in Debian" if name == "firecracker" else name)
        try:
            path: str | None = require_tool(name, package)
        except MissingTool:
            path = None
        if name == "busybox" and path is not None and not is_static_executable(Path(path)):
            path = None  # the dynamic busybox package is no use in an initramfs
        out.append(Tool(name=name, package=package, needed_for=needed_for, required=required, path=path))
    return out


def _path_of(tools: list[Tool], name: str) -> str | None:
    return next((t.path for t in tools if t.name == name), None)


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _resources(data_dir: Path) -> Resources:
    total, available = probes.memory()
    return Resources(
        disk_free_bytes=shutil.disk_usage(_existing(data_dir)).free,
        memory_total_bytes=total,
        memory_available_bytes=available,
    )


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _fingerprint(data_dir: Path, images_dir: Path) -> list[object]:
    """What a cached probe result must match to be reused: this boot, the tools installed, the data dir,
    the guest kernel KVM would be tried with."""
    tools = [
        shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
        for name, *_ in _TOOLS
    ]
    qemu = tools[0]
    kernel = find_guest_kernel(images_dir)
    return [
        _FORMAT,
        os.uname().release,
        _boot_id(),
        str(data_dir),
        tools,
        Path(qemu).stat().st_mtime_ns if qemu else 0,
        str(kernel.resolve()) if kernel else None,
    ]


def _load(cache: Path, fingerprint: list[object]) -> HostCapabilities | None:
    try:
        data = json.loads(cache.read_text())
        if data.get("fingerprint") != fingerprint:
            return None
        return HostCapabilities.model_validate(data["capabilities"])
    except (OSError, ValueError, KeyError, ValidationError):
        return None


def _store(cache: Path, fingerprint: list[object], caps: HostCapabilities) -> None:
    with contextlib.suppress(OSError):  # a read-only data dir only costs a re-probe next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp-{os.getpid()}")
        payload = {"fingerprint": fingerprint, "capabilities": caps.model_dump(mode="json")}
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(cache)
