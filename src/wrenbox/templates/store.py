"""The template store: build, publish, list, delete, and start VMs from templates (see the package doc)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import BaseModel, ConfigDict, ValidationError

from wrenbox.errors import AlreadyExists, CorruptData, NotFound
from wrenbox.fileio import clone_or_copy
from wrenbox.images import Image, guest_kernel_args
from wrenbox.names import validate_name
from wrenbox.network import GATEWAY_IP, GUEST_IP, GUEST_NETWORK, NetworkSlot
from wrenbox.rollback import Rollback
from wrenbox.rootfs import BaseImage, RootfsBackend
from wrenbox.templates.vm import agent_client, agent_ready, netns_path
from wrenbox.vmm.base import Drive, Driver, Kernel, Machine, MemoryFile, Snapshot, Vm, VmConfig

if TYPE_CHECKING:
    from wrenbox.config import Settings

__all__ = ["Placement", "Template", "TemplateConfig", "TemplateManifest", "TemplateStore", "Templates"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SNAPSHOT_DIR = "snapshot"
MEMORY = "memory"
ROOTFS = "rootfs.ext4"
WARM_UP = (["true"], ["/bin/sh", "-c", "true"], ["python3", "-c", "pass"])


@dataclass(frozen=True, slots=True)
class TemplateConfig:
    templates_dir: Path
    vcpus: int = 1
    memory_mib: int = 512
    boot_timeout_s: float = 180.0  # cold boot to agent under TCG is ~5 s on a quiet host
    ready_timeout_s: float = 30.0  # restore to agent

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> TemplateConfig:
        defaults = settings.defaults
        return cls(
            **{
                "templates_dir": settings.templates_dir,
                "vcpus": defaults.vcpus,
                "memory_mib": defaults.memory_mb,
                **overrides,
            }
        )


class TemplateManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int = 1
    name: str
    created_at: datetime
    image: str
    image_build_key: str
    kernel_release: str
    vcpus: int
    memory_mib: int
    disk_format: str
    rootfs: BaseImage  # fingerprint of rootfs.ext4 (its path as it was at build time)
    memory_allocated: int  # bytes of guest RAM on disk (the rest are holes: never touched or freed)
    memory_sha256: str  # nothing may ever write to the RAM file of a template; this proves it
    state_bytes: int
    timings: dict[str, float]


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    path: Path
    manifest: TemplateManifest

    @property
    def memory(self) -> Path:
        return self.path / MEMORY

    @property
    def rootfs(self) -> Path:
        return self.path / ROOTFS

    def rootfs_image(self) -> BaseImage:
        """The recorded fingerprint of :attr:`rootfs`, for creating sandbox disks without re-hashing it."""
        return self.manifest.rootfs.model_copy(update={"path": self.rootfs})

    def snapshot(self) -> Snapshot:
        return Snapshot.load(self.path / SNAPSHOT_DIR)

    def machine(self, disk: Drive) -> Machine:
        """The machine this template was snapshotted on, with ``disk`` (made from :attr:`rootfs`) as root."""
        return Machine(vcpus=self.manifest.vcpus, memory_mib=self.manifest.memory_mib, drives=(disk,))


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one VM started from a template lives. All of it belongs to the caller.

    ``disk`` is the sandbox's root disk, made by the rootfs backend from :meth:`Template.rootfs_image`.
    ``memory`` is where :meth:`Templates.start` creates the VM's own copy of the template's RAM (on
    tmpfs it is faster to make and costs no disk writeback while the VM runs; on disk it survives a
    host restart as it is).
    """

    run_dir: Path
    disk: Drive
    slot: NetworkSlot
    memory: Path


class TemplateStore:
    """The published templates in ``root``: reading them needs no VMM."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, name: str) -> Template:
        path = self.root / validate_name(name, what="template name")
        try:
            raw = (path / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"template {name!r} does not exist (wrenbox template build {name})") from None
        try:
            return Template(name, path, TemplateManifest.model_validate_json(raw))
        except ValidationError as exc:
            raise CorruptData(f"template {name!r}: unreadable manifest: {exc}") from exc

    def list(self) -> list[Template]:
        if not self.root.is_dir():
            return []
        return [
            self.get(p.name) for p in sorted(self.root.iterdir()) if p.is_dir() and not p.name.startswith(".")
        ]

    def delete(self, name: str) -> None:
        """Remove template ``name``. Whether anything still uses it is the caller's to check first."""
        path = self.get(name).path
        trash = self.root / f".trash-{name}-{secrets.token_hex(4)}"
        path.rename(trash)  # gone from listings at once, even if the removal below is interrupted
        shutil.rmtree(trash)

    def reclaim(self) -> list[str]:
        """Remove what interrupted builds and deletions left (run at start, when no build is running)."""
        if not self.root.is_dir():
            return []
        stale = [p for p in self.root.iterdir() if p.name.startswith((".build-", ".trash-"))]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return [p.name for p in stale]


class Templates:
    """Builds templates into the store, and is the one way to start VMs from them."""

    def __init__(self, config: TemplateConfig, *, driver: Driver, rootfs: RootfsBackend) -> None:
        self.config = config
        self.driver = driver
        self.rootfs = rootfs
        self.store = TemplateStore(config.templates_dir)

    async def build(
        self, name: str, image: Image, slot: NetworkSlot, *, on_step: Callable[[str], None] | None = None
    ) -> Template:
        """Boot ``image`` in network slot ``slot`` (which must exist), wait for its agent, snapshot it and
        publish the result as template ``name``. AlreadyExists if it exists; nothing is left on failure."""
        validate_name(name, what="template name")
        if (self.store.root / name).exists():
            raise AlreadyExists(f"template {name!r} already exists; templates are immutable")
        self.store.root.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(4)
        build_dir = self.store.root / f".build-{name}-{token}"
        build_dir.mkdir()
        timings: dict[str, float] = {}
        step = _Stepper(timings, on_step)
        try:
            with step("disk"):
                disk = await self.rootfs.create(image.rootfs, f"template-build-{token}")
            try:
                snapshot = await self._boot_and_snapshot(
                    image, slot, build_dir, Drive(disk.path, disk.format), step
                )
                with step("flatten"):
                    base = await self.rootfs.flatten(disk, build_dir / ROOTFS)
            finally:
                with anyio.CancelScope(shield=True):
                    await self.rootfs.remove(disk)
            with step("publish"):
                await self._publish(name, image, build_dir, str(disk.format), base, snapshot, timings)
        finally:
            if build_dir.exists():
                shutil.rmtree(build_dir, ignore_errors=True)
        log.info("built template %s in %.1f s: %s", name, sum(timings.values()), timings)
        return self.store.get(name)

    async def _publish(
        self,
        name: str,
        image: Image,
        build_dir: Path,
        disk_format: str,
        base: BaseImage,
        snapshot: Snapshot,
        timings: dict[str, float],
    ) -> None:
        await self._seal(
            name,
            build_dir,
            image=image.name,
            image_build_key=image.manifest.build_key,
            kernel_release=image.manifest.kernel.release,
            vcpus=self.config.vcpus,
            memory_mib=self.config.memory_mib,
            disk_format=disk_format,
            rootfs=base,
            state_bytes=snapshot.meta.state_bytes,
            timings=timings,
        )

    async def publish_derived(
        self,
        name: str,
        build_dir: Path,
        parent: Template,
        *,
        base: BaseImage,
        snapshot: Snapshot,
        timings: dict[str, float],
    ) -> Template:
        """Publish ``build_dir`` (``memory``, ``snapshot/``, ``rootfs.ext4`` in place) as template ``name``,
        made from a sandbox of ``parent``: same image, kernel and machine, new memory and disk."""
        validate_name(name, what="template name")
        m = parent.manifest
        await self._seal(
            name,
            build_dir,
            image=m.image,
            image_build_key=m.image_build_key,
            kernel_release=m.kernel_release,
            vcpus=m.vcpus,
            memory_mib=m.memory_mib,
            disk_format=m.disk_format,
            rootfs=base,
            state_bytes=snapshot.meta.state_bytes,
            timings=timings,
        )
        return self.store.get(name)

    async def _seal(self, name: str, build_dir: Path, **fields: Any) -> None:
        """Seal the build directory and rename it into place: it appears complete or not at all."""
        # Durable first: ext4 allocates delayed writes only now, and the manifest records the size.
        await anyio.to_thread.run_sync(
            _freeze, build_dir / MEMORY, build_dir / ROOTFS, build_dir / SNAPSHOT_DIR
        )
        manifest = TemplateManifest(
            name=name,
            created_at=datetime.now().astimezone(),
            memory_allocated=(build_dir / MEMORY).stat().st_blocks * 512,
            memory_sha256=await anyio.to_thread.run_sync(_sha256, build_dir / MEMORY),
            **fields,
        )
        await anyio.to_thread.run_sync(_commit, build_dir, self.store.root / name, manifest)

    async def _boot_and_snapshot(
        self, image: Image, slot: NetworkSlot, build_dir: Path, disk: Drive, step: _Stepper
    ) -> Snapshot:
        placement = Placement(build_dir / "run", disk, slot, build_dir / MEMORY)
        machine = Machine(vcpus=self.config.vcpus, memory_mib=self.config.memory_mib, drives=(disk,))
        with step("boot"):  # to the agent's first answer
            vm = await self.boot(image, machine, placement)
        try:
            with step("warm_up"):
                await self._warm_up(slot)
            with step("snapshot"):
                (build_dir / SNAPSHOT_DIR).mkdir()
                return await vm.snapshot(build_dir / SNAPSHOT_DIR)
        finally:
            with anyio.CancelScope(shield=True):
                await vm.destroy()
            shutil.rmtree(placement.run_dir, ignore_errors=True)

    async def boot(self, image: Image, machine: Machine, placement: Placement) -> Vm:
        """Cold-boot ``image`` on ``machine`` into ``placement``; returns once the agent answers (no
        ``/init``). The VM is destroyed again if its agent never answers."""
        args = guest_kernel_args(
            image.manifest.kernel_args, ip=f"{GUEST_IP}/{GUEST_NETWORK.prefixlen}", gateway=str(GATEWAY_IP)
        )
        config = VmConfig(
            machine=machine,
            memory=MemoryFile(placement.memory),
            run_dir=placement.run_dir,
            kernel=Kernel(image.kernel, image.initramfs, " ".join(args)),
            netns=netns_path(placement.slot),
        )
        vm = await self.driver.boot(config)
        try:
            await agent_ready(vm, placement.slot, timeout=self.config.boot_timeout_s, init=False)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await vm.destroy()
            raise
        return vm

    async def start(self, template: Template, placement: Placement, *, init: bool = True) -> Vm:
        """Restore ``template`` into ``placement``; returns once the agent answered (and, with ``init``,
        took a plain ``/init``: clock and CRNG; callers with more to say pass ``init=False``)."""
        config = VmConfig(
            machine=template.machine(placement.disk),
            memory=MemoryFile(placement.memory),
            run_dir=placement.run_dir,
            netns=netns_path(placement.slot),
        )
        snapshot = template.snapshot()
        if placement.memory.exists():
            raise AlreadyExists(f"{placement.memory} exists; a VM's RAM file must be new")
        async with Rollback(f"start from template {template.name}") as rb:
            rb.push(f"RAM file {placement.memory}", placement.memory.unlink, True)
            await anyio.to_thread.run_sync(clone_or_copy, template.memory, placement.memory)
            vm = await self.driver.restore(config, snapshot)
            rb.push(f"VM {vm.pid}", vm.destroy)
            await agent_ready(vm, placement.slot, timeout=self.config.ready_timeout_s, init=init)
            rb.commit()
        return vm

    async def _warm_up(self, slot: NetworkSlot) -> None:
        """Do once before the snapshot what every sandbox does first (``/init``, a few commands), so the
        agent's lazily imported modules and the guest's page cache are already in the template's memory."""
        async with agent_client(slot) as client:
            await client.init()
            for argv in WARM_UP:
                await client.processes.exec(argv, timeout=self.config.boot_timeout_s)


class _Stepper:
    """Times named build steps into ``timings`` (a step may be entered more than once) and reports
    each start to ``on_step``."""

    def __init__(self, timings: dict[str, float], on_step: Callable[[str], None] | None) -> None:
        self.timings = timings
        self.on_step = on_step

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.on_step is not None:
            self.on_step(name)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.monotonic() - t0, 3)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _commit(build_dir: Path, dest: Path, manifest: TemplateManifest) -> None:
    """Write the manifest last, then rename the directory into place, durably."""
    (build_dir / MANIFEST).write_text(manifest.model_dump_json(indent=1))
    _freeze(build_dir / MANIFEST, build_dir)
    try:
        build_dir.rename(dest)
    except OSError as exc:  # ENOTEMPTY / EEXIST: someone published this name meanwhile
        raise AlreadyExists(f"template {dest.name!r} already exists; templates are immutable") from exc
    _freeze(dest.parent)


def _freeze(*paths: Path) -> None:
    """Make files read-only, and files and directories durable."""
    for path in paths:
        if path.is_file():
            path.chmod(0o444)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
