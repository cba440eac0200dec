"""The Firecracker driver: microVMs on KVM hosts, driven through Firecracker's API socket.

Each VM runs in its own mount namespace inside the sandbox's network namespace, its disks linked into a
private ``vm_dir`` so that snapshots record stable drive paths (:mod:`wrenbox.vmm.firecracker.launch`).

Cold boot: ``/boot-source``, ``/drives/*``, ``/machine-config`` (dirty page tracking on, which Diff
snapshots need), ``/network-interfaces/*``, ``/balloon``, ``/entropy``, then ``InstanceStart``.
``PATCH /vm`` pauses and resumes. A snapshot writes the device state to ``<dest>/vmstate`` and guest RAM
to ``<dest>/memfile.raw``: all of it (Full) or, sparse, only the pages written since the previous
snapshot (Diff); the caller turns that file into a memory chain (:mod:`wrenbox.memory.process`, a Diff
with ``RawKind.SPARSE_DIFF``) and removes it. A restore loads the state with guest RAM from a complete
memory file (``File`` backend, mapped private: the file is only read) or from a memory chain served
lazily by the VM's own UFFD page server (:class:`~wrenbox.vmm.base.PagedMemory`, ``Uffd`` backend),
then resumes. API calls have deadlines; snapshot create and load get one sized by guest memory.

Files in ``run_dir``: ``firecracker.sock`` (API), ``firecracker.log`` (Firecracker's output and the
guest's serial console), ``uffd.sock`` (the page server, while a restore hands memory over).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wrenbox.command import arun, require_tool, spawn
from wrenbox.errors import InvalidArgument, MissingTool, NotFound, Unsupported
from wrenbox.memory.uffd import PageServer, PageServerConfig
from wrenbox.pids import ProcessRef
from wrenbox.rollback import Rollback
from wrenbox.vmm.base import (
    SNAPSHOT_STATE,
    Driver,
    Machine,
    PagedMemory,
    Snapshot,
    SnapshotKind,
    Vm,
    VmConfig,
    log_tail,
)
from wrenbox.vmm.firecracker.api import FirecrackerApi
from wrenbox.vmm.firecracker.launch import drive_link, end_process, launch_argv, wait_for_socket
from wrenbox.vmm.firecracker.memory import RAW_MEMORY, memory_backend, page_server

if TYPE_CHECKING:
    from wrenbox.errors import WrenboxError
    from wrenbox.probe.capabilities import HostCapabilities

__all__ = [
    "API_SOCKET",
    "RAW_MEMORY",
    "FirecrackerConfig",
    "FirecrackerDriver",
    "FirecrackerVm",
    "boot_calls",
]

log = logging.getLogger(__name__)

# Bump when the device set or the link names change: snapshots of another layout are refused by name.
MACHINE_LAYOUT = "firecracker/1"
API_SOCKET = "firecracker.sock"
UFFD_SOCKET = "uffd.sock"
FIRECRACKER_LOG = "firecracker.log"
_MAX_VCPUS = 32  # Firecracker's limit
_EXIT_GRACE_S = 0.2
_SUN_PATH_MAX = 107
_VERSION = re.compile(rb"Firecracker v(\S+)")
# What GET / reports, in the run-state words QEMU uses.
_STATES = {"Running": "running", "Paused": "paused", "Not started": "prelaunch"}
_NOT_PACKAGED = "not packaged in Debian: install a release binary from github.com/firecracker-microvm"


@dataclass(frozen=True, slots=True)
class FirecrackerConfig:
    """How this host runs Firecracker. ``vm_dir`` is part of every snapshot (drive paths point into it):
    change it and older snapshots are refused."""

    binary: str = "firecracker"
    vm_dir: Path = Path("/run/wrenbox-fc")
    boot_args: str = "console=ttyS0 reboot=k panic=1 pci=off"
    track_dirty_pages: bool = True
    """Dirty page tracking (boot and restore): what Diff snapshots are made of."""
    entropy: bool = True
    """A virtio-rng device (``/entropy``)."""
    free_page_reporting: bool = True
    """With ``Machine.balloon``: the balloon reports freed guest pages (Firecracker 1.14 and later)."""
    start_timeout_s: float = 5.0
    api_timeout_s: float = 10.0
    snapshot_timeout_s: float = 10.0
    snapshot_timeout_per_gib_s: float = 10.0
    """Snapshot create/load: the floor plus this per GiB of guest memory (written or read in full)."""
    kill_grace_s: float = 10.0
    handoff_timeout_s: float = 5.0
    """After a ``Uffd`` load returned: how long the page server may still take to accept the hand-off."""
    page_server: PageServerConfig = field(default_factory=PageServerConfig)

    def __post_init__(self) -> None:
        vm_dir = Path(self.vm_dir)
        if not vm_dir.is_absolute() or os.path.normpath(vm_dir) != str(vm_dir) or vm_dir == Path("/"):
            raise InvalidArgument(f"vm_dir must be a normalised absolute path below /, not {str(vm_dir)!r}")
        object.__setattr__(self, "vm_dir", vm_dir)
        for name in ("start_timeout_s", "api_timeout_s", "snapshot_timeout_s", "kill_grace_s"):
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"{name} must be positive, not {getattr(self, name)!r}")
        if self.snapshot_timeout_per_gib_s < 0:
            raise InvalidArgument("snapshot_timeout_per_gib_s must not be negative")

    def snapshot_timeout(self, memory_mib: int) -> float:
        """Deadline of a snapshot create or load for a guest of ``memory_mib``."""
        return self.snapshot_timeout_s + self.snapshot_timeout_per_gib_s * memory_mib / 1024

    @classmethod
    def from_host(cls, caps: HostCapabilities, **overrides: Any) -> FirecrackerConfig:
        """The configuration for this host; refused where the probe found no Firecracker or no working KVM."""
        if caps.firecracker is None:
            raise MissingTool("firecracker", _NOT_PACKAGED)
        if not caps.kvm.usable:
            raise Unsupported(f"Firecracker needs KVM, which does not work here: {caps.kvm.detail}")
        return cls(**{"binary": caps.firecracker, **overrides})


def drive_id(index: int) -> str:
    return "rootfs" if index == 0 else f"drive{index}"


def boot_calls(config: VmConfig, fc: FirecrackerConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """The API calls of a cold boot, in order: (method, path, body)."""
    m, kernel = config.machine, config.kernel
    if kernel is None:
        raise InvalidArgument("a cold boot needs a kernel")
    boot_source: dict[str, Any] = {
        "kernel_image_path": str(kernel.path),
        "boot_args": f"{fc.boot_args} {kernel.cmdline}".strip(),
    }
    if kernel.initrd is not None:
        boot_source["initrd_path"] = str(kernel.initrd)
    calls: list[tuple[str, str, dict[str, Any]]] = [("PUT", "/boot-source", boot_source)]
    for i, drive in enumerate(m.drives):
        body = {
            "drive_id": drive_id(i),
            "path_on_host": str(fc.vm_dir / drive_link(i)),
            "is_root_device": i == 0,
            "is_read_only": drive.read_only,
        }
        calls.append(("PUT", f"/drives/{drive_id(i)}", body))
    machine = {
        "vcpu_count": m.vcpus,
        "mem_size_mib": m.memory_mib,
        "smt": False,
        "track_dirty_pages": fc.track_dirty_pages,
    }
    calls.append(("PUT", "/machine-config", machine))
    for i, nic in enumerate(m.nics):
        body = {"iface_id": f"eth{i}", "host_dev_name": nic.tap, "guest_mac": nic.mac}
        calls.append(("PUT", f"/network-interfaces/eth{i}", body))
    if m.balloon:
        balloon: dict[str, Any] = {"amount_mib": 0, "deflate_on_oom": True}
        if fc.free_page_reporting:
            balloon["free_page_reporting"] = True
        calls.append(("PUT", "/balloon", balloon))
    if fc.entropy:
        calls.append(("PUT", "/entropy", {}))
    calls.append(("PUT", "/actions", {"action_type": "InstanceStart"}))
    return calls


class FirecrackerVm(Vm):
    """A Firecracker process. ``page_server`` is set when its memory comes from a :class:`PagedMemory`:
    the VM owns it and stops it in :meth:`destroy`, once the process is gone."""

    def __init__(
        self,
        driver: FirecrackerDriver,
        config: VmConfig,
        process: ProcessRef,
        argv: list[str],
        page_server: PageServer | None = None,
    ) -> None:
        self.driver = driver
        self.config = config
        self.process = process
        self.argv = argv
        self.page_server = page_server
        self.timings: dict[str, float] = {}
        self.api = FirecrackerApi(
            config.run_dir / API_SOCKET, timeout=driver.config.api_timeout_s, why_gone=self._why_gone
        )

    def __repr__(self) -> str:
        return f"<FirecrackerVm pid={self.pid} run_dir={self.config.run_dir}>"

    @property
    def api_socket(self) -> Path:
        return self.config.run_dir / API_SOCKET

    @property
    def memory_error(self) -> WrenboxError | None:
        """Why the page server stopped serving this VM's memory, if it did (the VM is then stuck)."""
        return None if self.page_server is None else self.page_server.error

    async def console_tail(self, max_bytes: int = 4000) -> str:
        return self._log_tail(max_bytes)

    def _log_tail(self, max_bytes: int) -> str:
        return log_tail(self.config.run_dir / FIRECRACKER_LOG, max_bytes)

    def _why_gone(self) -> str:
        # A VMM that just hung up is usually on its way out: a moment lets the message say how it ended.
        state = "exited" if self.process.wait_gone(_EXIT_GRACE_S) else "alive"
        text = self._log_tail(2000).rstrip()
        tail = f"\n--- firecracker log (end) ---\n{text}" if text else ""
        return f" (Firecracker pid {self.pid}, {state}){tail}"

    async def status(self) -> str:
        state = str((await self.api.get("/"))["state"])
        return _STATES.get(state, state.lower())

    async def pause(self) -> None:
        t0 = time.monotonic()
        await self.api.patch("/vm", {"state": "Paused"})
        self.timings["pause"] = time.monotonic() - t0

    async def resume(self) -> None:
        t0 = time.monotonic()
        await self.api.patch("/vm", {"state": "Resumed"})
        self.timings["resume"] = time.monotonic() - t0

    async def snapshot(self, dest: Path, kind: SnapshotKind = "full") -> Snapshot:
        if kind not in ("full", "diff"):
            raise InvalidArgument(f"unknown snapshot kind {kind!r}; expected 'full' or 'diff'")
        fc = self.driver.config
        if kind == "diff" and not fc.track_dirty_pages:
            raise Unsupported("diff snapshots need dirty page tracking (track_dirty_pages), which is off")
        dest, state, memory = _snapshot_files(dest)
        t0 = time.monotonic()
        if await self.status() == "running":
            await self.api.patch("/vm", {"state": "Paused"})
        t_pause = time.monotonic()
        body = {
            "snapshot_type": "Full" if kind == "full" else "Diff",
            "snapshot_path": str(state),
            "mem_file_path": str(memory),
        }
        await self.api.put(
            "/snapshot/create", body, timeout=fc.snapshot_timeout(self.config.machine.memory_mib)
        )
        t_saved = time.monotonic()
        # Only the state file is sealed: RAW_MEMORY is an intermediate, processed and removed.
        snapshot = await self._seal_snapshot(dest, state, kind)
        t_end = time.monotonic()
        self.timings.update(
            pause=t_pause - t0, save=t_saved - t_pause, sync=t_end - t_saved, snapshot=t_end - t0
        )
        log.info("%s snapshot of %r into %s in %.3f s", kind, self, dest, t_end - t0)
        return snapshot

    async def destroy(self) -> None:
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(end_process, self.process, self.driver.config.kill_grace_s)
            if self.page_server is not None:
                # Only now: a living VM blocks on the next fault of a page nobody serves.
                await asyncio.to_thread(self.page_server.stop)
        finally:
            self.api_socket.unlink(missing_ok=True)
        self.timings["destroy"] = time.monotonic() - t0

    async def _kill(self) -> None:
        """End a VM that failed to start (its page server is the caller's to stop)."""
        await asyncio.to_thread(end_process, self.process, self.driver.config.kill_grace_s)
        self.api_socket.unlink(missing_ok=True)

    async def _load(self, snapshot: Snapshot, backend: dict[str, str]) -> None:
        fc = self.driver.config
        body = {
            "snapshot_path": str(snapshot.state_path),
            "mem_backend": backend,
            "track_dirty_pages": fc.track_dirty_pages,
            "resume_vm": False,
        }
        t0 = time.monotonic()
        await self.api.put(
            "/snapshot/load", body, timeout=fc.snapshot_timeout(self.config.machine.memory_mib)
        )
        t_load = time.monotonic()
        if self.page_server is not None:
            # Firecracker sent its hand-off during the load; resume only once it checked out.
            await asyncio.to_thread(self.page_server.wait_ready, fc.handoff_timeout_s)
        t_ready = time.monotonic()
        await self.api.patch("/vm", {"state": "Resumed"})
        self.timings.update(load=t_load - t0, handoff=t_ready - t_load, resume=time.monotonic() - t_ready)


def _snapshot_files(dest: Path) -> tuple[Path, Path, Path]:
    """``dest`` and its state and memory file paths, with no such files in the way."""
    dest = Path(dest).absolute()
    if not dest.is_dir():
        raise NotFound(f"snapshot directory {dest} does not exist")
    state, memory = dest / SNAPSHOT_STATE, dest / RAW_MEMORY
    # Firecracker merges a Diff into an existing memory file of the right size; a new file holds
    # exactly the pages written since the last snapshot, which is what the memory chain needs.
    memory.unlink(missing_ok=True)
    state.unlink(missing_ok=True)
    return dest, state, memory


class FirecrackerDriver(Driver):
    name = "firecracker"

    def __init__(self, config: FirecrackerConfig | None = None) -> None:
        self.config = config or FirecrackerConfig()
        self._version: str | None = None

    async def version(self) -> str:
        """Firecracker's version (``1.7.0``), asked of the binary once."""
        if self._version is None:
            binary = self._binary()
            done = await arun([binary, "--version"], timeout=self.config.api_timeout_s)
            found = _VERSION.search(done.stdout)
            if found is None:
                raise Unsupported(f"cannot tell the version of {binary}: {done.text.strip()[:200]!r}")
            self._version = found.group(1).decode()
        return self._version

    def _binary(self) -> str:
        binary = self.config.binary
        return binary if os.sep in binary else require_tool(binary, _NOT_PACKAGED)

    def pinned(self, machine: Machine) -> dict[str, object]:
        """What a snapshot taken by this driver fixes: the machine, its tap names (Firecracker reopens the
        recorded ones), the drive links' directory and the device layout."""
        return {
            **machine.pinned(),
            "taps": [nic.tap for nic in machine.nics],
            "vm_dir": str(self.config.vm_dir),
            "entropy": self.config.entropy,
            "free_page_reporting": machine.balloon and self.config.free_page_reporting,
            "layout": MACHINE_LAYOUT,
        }

    async def boot(self, config: VmConfig) -> FirecrackerVm:
        calls = boot_calls(config, self.config)
        assert config.kernel is not None  # boot_calls refused it otherwise
        for path in (config.kernel.path, config.kernel.initrd):
            if path is not None and not path.is_file():
                raise NotFound(f"kernel file {path} does not exist")
        self._check(config)
        async with Rollback(f"boot in {config.run_dir}") as rb:
            vm = await self._launch(config, rb)
            t0 = time.monotonic()
            for method, path, body in calls:
                await vm.api.call(method, path, body)
            rb.commit()
        vm.timings["configure"] = time.monotonic() - t0
        vm.timings["start"] = sum(vm.timings.values())
        return vm

    async def restore(self, config: VmConfig, snapshot: Snapshot) -> FirecrackerVm:
        snapshot.check_restorable(self.name, await self.version(), self.pinned(config.machine))
        backend = memory_backend(config, snapshot, config.run_dir / UFFD_SOCKET)
        self._check(config)
        async with Rollback(f"restore of {snapshot.dir}") as rb:
            server = None
            if isinstance(config.memory, PagedMemory):
                server = await asyncio.to_thread(
                    page_server, config, config.run_dir / UFFD_SOCKET, self.config.page_server
                )
                rb.push(f"page server {server.socket_path}", asyncio.to_thread, server.stop)
                server.start()
            vm = await self._launch(config, rb, server)
            await vm._load(snapshot, backend)
            rb.commit()
        vm.timings["start"] = sum(vm.timings.values())
        return vm

    def adopt(self, config: VmConfig, process: ProcessRef) -> FirecrackerVm:
        """A VM started by an earlier wrenbox process. A page server does not survive that process: a
        VM restored from PagedMemory is only safe to adopt once its memory was fully prefetched."""
        return FirecrackerVm(self, config, process, [])

    def _check(self, config: VmConfig) -> None:
        """Refuse what Firecracker cannot run, before anything starts."""
        m, vm_dir = config.machine, self.config.vm_dir
        if m.vcpus > _MAX_VCPUS:
            raise InvalidArgument(f"Firecracker runs at most {_MAX_VCPUS} vCPUs, not {m.vcpus}")
        for i, drive in enumerate(m.drives):
            if drive.format != "raw":
                raise Unsupported(
                    f"Firecracker takes raw disks only; drive {i} ({drive.path}) is {drive.format}"
                )
            if drive.path.is_relative_to(vm_dir):
                raise InvalidArgument(f"drive {drive.path} lies in {vm_dir}, which each VM mounts over")
            if not drive.path.exists():
                raise NotFound(f"disk {drive.path} does not exist")
        if config.run_dir.is_relative_to(vm_dir):
            raise InvalidArgument(
                f"run directory {config.run_dir} lies in {vm_dir}, which each VM mounts over"
            )
        for name in (API_SOCKET, UFFD_SOCKET):
            if len(os.fsencode(config.run_dir / name)) > _SUN_PATH_MAX:
                raise InvalidArgument(f"run directory {config.run_dir} is too long for a unix socket path")
        if config.netns is not None and not config.netns.exists():
            raise NotFound(f"network namespace {config.netns} does not exist")

    async def _launch(
        self, config: VmConfig, rb: Rollback, page_server: PageServer | None = None
    ) -> FirecrackerVm:
        """Start Firecracker for a checked ``config`` (its end pushed on ``rb``) until its API answers."""
        command = [self._binary(), "--api-sock", str(config.run_dir / API_SOCKET)]
        disks = [drive.path for drive in config.machine.drives]
        argv = launch_argv(command, vm_dir=self.config.vm_dir, disks=disks, netns=config.netns)
        config.run_dir.mkdir(parents=True, exist_ok=True)
        self.config.vm_dir.mkdir(parents=True, exist_ok=True)  # only the mount point, empty on the host
        (config.run_dir / API_SOCKET).unlink(missing_ok=True)  # Firecracker refuses an existing path
        t0 = time.monotonic()
        process = spawn(argv, log=config.run_dir / FIRECRACKER_LOG)
        vm = FirecrackerVm(self, config, process, argv, page_server)
        rb.push(f"Firecracker pid {vm.pid}", vm._kill)
        t_spawn = time.monotonic()
        await wait_for_socket(vm.api_socket, process, self.config.start_timeout_s, vm._why_gone)
        vm.timings = {"spawn": t_spawn - t0, "api": time.monotonic() - t_spawn}
        log.info("started %r in %.3f s", vm, time.monotonic() - t0)
        return vm
