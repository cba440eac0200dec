"""The QEMU driver: microVMs with ``-M microvm,acpi=on``, TCG where KVM does not work, driven over QMP.

Guest RAM is a ``memory-backend-file`` mapped shared on a file of the VM's own, so a pause takes tens of
milliseconds: ``stop``, then only the device state goes out through migration with ``x-ignore-shared``
(the RAM file already holds the memory). Restores start QEMU with ``-incoming defer`` and load the state
with ``migrate-incoming``; a restore needs no kernel. QEMU 7.2 has no ``file:`` migration URI, and its
seccomp policy here forbids ``exec:``, so wrenbox opens the state file and hands QEMU the descriptor over
the monitor (``getfd``, then ``fd:``).

Confinement (:mod:`wrenbox.vmm.jail`, when the VM config names one): QEMU runs as the VM's own user in a
root of its own, with ``-sandbox on`` (QEMU's seccomp filter: no obsolete syscalls, no privilege changes,
no spawning, no resource-control calls) and, under TCG, a translation cache of ``tb_size_mib`` (QEMU's
default reserves up to 1 GiB of host memory for it).

Facts this relies on (``research/lab-qemu.md``): microvm finds its virtio-mmio devices through ACPI only;
under TCG the guest kernel needs ``tsc_early_khz=<host TSC kHz>`` (it hangs calibrating otherwise) and
``tsc=reliable`` (all vCPUs read the one host TSC).

Each VM's files live in the caller's ``run_dir``: ``qmp.sock`` (the monitor) and ``qemu.log`` (QEMU's own
stdout/stderr). The guest's serial console goes to a ring buffer in QEMU (``CONSOLE_RING`` bytes), read over
the monitor for error messages: a guest writing to its console forever costs the host nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

from wrenbox.command import arun, require_tool, spawn
from wrenbox.errors import InvalidArgument, MissingTool, NotFound, Unsupported, WrenboxError
from wrenbox.pids import ProcessRef
from wrenbox.vmm.base import (
    SNAPSHOT_STATE,
    Driver,
    Machine,
    MemoryFile,
    Snapshot,
    SnapshotKind,
    Vm,
    VmConfig,
    log_tail,
)
from wrenbox.vmm.jail import Confinement, Console, JailSpec, grant_read, own
from wrenbox.vmm.qmp import Qmp, session

if TYPE_CHECKING:
    from wrenbox.probe.capabilities import HostCapabilities

__all__ = ["QemuConfig", "QemuDriver", "QemuVm", "qemu_argv"]

log = logging.getLogger(__name__)

# Bump when the fixed part of the command line changes (device set or order): snapshots taken with another
# layout would not load, so they are refused by name.
MACHINE_LAYOUT = "microvm-acpi/1"
QMP_SOCKET = "qmp.sock"
QEMU_LOG = "qemu.log"
CONSOLE_LOG = "console.log"  # the last CONSOLE_RING bytes of a confined VM's console, once QEMU is gone
CONSOLE_RING = 64 * 1024  # a power of two, as QEMU's ringbuf wants
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# Descriptors the jail opens for QEMU (high, clear of what the interpreter in between may hold).
RAM_FD = 20
CONSOLE_FD = 22
TAP_FD = 23
_SUN_PATH_MAX = 107
_VERSION = re.compile(rb"QEMU emulator version (\S+)")
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # QEMU gets none of the manager's environment
# RAM in shared file-backed memory stays out of the state file: the RAM file is the memory snapshot.
IGNORE_SHARED = {"capability": "x-ignore-shared", "state": True}


@dataclass(frozen=True, slots=True)
class QemuConfig:
    """How this host runs QEMU. ``accel`` is ``kvm`` only where the host probe proved KVM runs a guest;
    ``tsc_khz`` (the host TSC frequency, also from the probe) is required to cold-boot under TCG."""

    accel: Literal["tcg", "kvm"] = "tcg"
    tsc_khz: int | None = None
    binary: str = "qemu-system-x86_64"
    start_timeout_s: float = 10.0
    command_timeout_s: float = 10.0
    quit_timeout_s: float = 3.0
    kill_grace_s: float = 3.0
    # QEMU's default migration rate limit (32 MiB/s) would throttle the state file (and any RAM that
    # is not in the shared file, e.g. firmware blocks) for no reason: the VM is stopped anyway.
    migrate_max_bandwidth: int = 32 << 30
    seccomp: bool = True
    tb_size_mib: int | None = 64

    def __post_init__(self) -> None:
        if self.accel not in ("tcg", "kvm"):
            raise InvalidArgument(f"unknown accelerator {self.accel!r}; expected 'tcg' or 'kvm'")
        if self.tsc_khz is not None and not 0 < self.tsc_khz < 100_000_000:
            raise InvalidArgument(f"implausible TSC frequency {self.tsc_khz} kHz")

    @classmethod
    def from_host(cls, caps: HostCapabilities, **overrides: Any) -> QemuConfig:
        """The configuration the host probe decided on: KVM only where it proved to work."""
        if caps.qemu is None:
            raise MissingTool("qemu-system-x86_64", "qemu-system-x86")
        return cls(**{"accel": caps.accel, "tsc_khz": caps.tsc_khz, "binary": caps.qemu.path, **overrides})


def _esc(value: object) -> str:
    """A value inside a QEMU ``key=value,...`` option (commas are doubled)."""
    return str(value).replace(",", ",,")


def qemu_argv(config: VmConfig, qemu: QemuConfig, *, incoming: bool) -> list[str]:
    """The QEMU command line for ``config``: a cold boot, or a restore waiting for its state. A confined
    VM finds its RAM file and taps at the descriptors its jail opened (:func:`jail_for`)."""
    m, run, memory = config.machine, config.run_dir, config.memory
    if not isinstance(memory, MemoryFile):
        raise Unsupported("QEMU maps guest RAM from a file; memory paged in on demand is for Firecracker")
    jailed = config.confinement is not None
    # A confined QEMU also logs its console to its jail's keeper (the last words survive QEMU).
    console_log = f",logfile=/proc/self/fd/{CONSOLE_FD},logappend=on" if jailed else ""
    mem_path = f"/proc/self/fd/{RAM_FD}" if jailed else memory.path
    accel = qemu.accel
    if accel == "tcg" and qemu.tb_size_mib:
        accel += f",tb-size={qemu.tb_size_mib}"
    argv = [
        qemu.binary,
        "-M", "microvm,acpi=on,memory-backend=ram0",
        "-accel", accel,
        "-cpu", "max" if qemu.accel == "tcg" else "host",
        "-smp", str(m.vcpus),
        "-m", f"{m.memory_mib}M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-object",
        f"memory-backend-file,id=ram0,size={m.memory_mib}M,mem-path={_esc(mem_path)},share=on",
        "-chardev", f"ringbuf,id=console,size={CONSOLE_RING}{console_log}",
        "-serial", "chardev:console",
        "-qmp", f"unix:{_esc(run / QMP_SOCKET)},server=on,wait=off",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-device,rng=rng0",
    ]  # fmt: skip
    if qemu.seccomp:
        argv += ["-sandbox", SECCOMP]
    for i, drive in enumerate(m.drives):
        argv += [
            "-drive",
            f"id=disk{i},file={_esc(drive.path)},format={drive.format},if=none"
            # A write the host cannot store (its disk is full) is the guest's I/O error: QEMU's default
            # stops the whole VM instead, which then answers nobody until someone frees space.
            + (",readonly=on" if drive.read_only else ",werror=report"),
            "-device", f"virtio-blk-device,drive=disk{i}",
        ]  # fmt: skip
    for i, nic in enumerate(m.nics):
        tap = f"fd={TAP_FD + 2 * i}" if jailed else f"ifname={nic.tap},script=no,downscript=no"
        argv += [
            "-netdev", f"tap,id=net{i},{tap}",
            "-device", f"virtio-net-device,netdev=net{i},mac={nic.mac}",
        ]  # fmt: skip
    if m.balloon:
        argv += ["-device", "virtio-balloon-device,free-page-reporting=on"]
    if incoming:
        return [*argv, "-incoming", "defer"]
    kernel = config.kernel
    if kernel is None:
        raise InvalidArgument("a cold boot needs a kernel")
    if qemu.accel == "tcg" and qemu.tsc_khz is None:
        raise Unsupported("cold boot under TCG needs the host TSC frequency (run `wrenbox doctor`)")
    clock = f"tsc_early_khz={qemu.tsc_khz} tsc=reliable " if qemu.accel == "tcg" else ""
    argv += [
        "-kernel",
        str(kernel.path),
        "-append",
        f"console=ttyS0 reboot=t panic=-1 {clock}{kernel.cmdline}",
    ]
    if kernel.initrd is not None:
        argv += ["-initrd", str(kernel.initrd)]
    return argv


def jail_for(config: VmConfig, confinement: Confinement) -> JailSpec:
    """What the jail of a confined QEMU holds: its run directory and writable disks as its own, its base
    images and kernel readable, its RAM file and taps as descriptors (see :func:`qemu_argv`)."""
    assert isinstance(config.memory, MemoryFile)
    m = config.machine
    spec = JailSpec(confinement, root=_jail_root(config.run_dir), netns=config.netns)
    spec.files[RAM_FD] = config.memory.path
    spec.console = Console(CONSOLE_FD, config.run_dir / CONSOLE_LOG, CONSOLE_RING)
    spec.taps = {TAP_FD + 2 * i: nic.tap for i, nic in enumerate(m.nics)}
    spec.write.append(config.run_dir)
    for drive in m.drives:
        (spec.read if drive.read_only else spec.write).append(drive.path)
        if drive.backing is not None:
            spec.read.append(drive.backing)
    if config.kernel is not None:
        spec.read += [p for p in (config.kernel.path, config.kernel.initrd) if p is not None]
    return spec


async def _kept_console(path: Path, max_bytes: int) -> str:
    for _ in range(20):
        text = log_tail(path, max_bytes)
        if text:
            return text
        await anyio.sleep(0.05)
    return "(nothing kept: QEMU was not confined, or its guest wrote nothing)"


def _jail_root(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".root")


def _enter(spec: JailSpec, memory: Path) -> None:
    """Hand the jail's files to its user: what it writes as its own, what it reads through its group."""
    spec.root.mkdir(mode=0o700, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # a cold boot's RAM file: QEMU sizes it
        os.close(os.open(memory, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    c = spec.confinement
    for path in (*spec.write, memory):
        own(path, c)
    for path in spec.read:
        grant_read(path, c)


class QemuVm(Vm):
    def __init__(self, driver: QemuDriver, config: VmConfig, process: ProcessRef, argv: list[str]) -> None:
        self.driver = driver
        self.config = config
        self.process = process
        self.argv = argv
        self.timings: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<QemuVm pid={self.pid} run_dir={self.config.run_dir}>"

    @property
    def qmp_socket(self) -> Path:
        return self.config.run_dir / QMP_SOCKET

    async def console_tail(self, max_bytes: int = 4000) -> str:
        """What the guest wrote to its console lately: the ring while QEMU runs, then what the console
        keeper of a confined VM kept (it writes when QEMU is gone, within a moment)."""
        if not self.process.alive():
            return await _kept_console(self.config.run_dir / CONSOLE_LOG, max_bytes)
        try:
            async with self._session(connect_timeout=1.0) as q:
                text = await q.run("ringbuf-read", device="console", size=CONSOLE_RING, format="utf8")
        except WrenboxError as exc:
            return f"(console unreadable: {exc.message})"
        return str(text)[-max_bytes:]

    def _why_gone(self) -> str:
        parts = [f" (QEMU pid {self.pid}, {'alive' if self.alive() else 'exited'})"]
        text = log_tail(self.config.run_dir / QEMU_LOG, 2000)
        if text.strip():
            parts.append(f"\n--- qemu log (end) ---\n{text.rstrip()}")
        return "".join(parts)

    def _session(self, connect_timeout: float | None = None) -> contextlib.AbstractAsyncContextManager[Qmp]:
        q = self.driver.config
        return session(
            self.qmp_socket,
            alive=self.process.alive,
            why_gone=self._why_gone,
            connect_timeout=connect_timeout or q.command_timeout_s,
            command_timeout=q.command_timeout_s,
        )

    async def status(self) -> str:
        async with self._session() as q:
            return str((await q.run("query-status"))["status"])

    async def pause(self) -> None:
        t0 = time.monotonic()
        async with self._session() as q:
            await q.run("stop")
        self.timings["stop"] = time.monotonic() - t0

    async def resume(self) -> None:
        t0 = time.monotonic()
        async with self._session() as q:
            await q.run("cont")
        self.timings["cont"] = time.monotonic() - t0

    async def snapshot(self, dest: Path, kind: SnapshotKind = "full") -> Snapshot:
        if kind != "full":
            raise Unsupported(f"QEMU snapshots are full snapshots; {kind!r} is not supported")
        dest = _existing_dir(dest)
        state = dest / SNAPSHOT_STATE
        q_cfg = self.driver.config
        t0 = time.monotonic()
        async with self._session() as q:
            await q.run("stop")
            t_stop = time.monotonic()
            await q.run("migrate-set-capabilities", capabilities=[IGNORE_SHARED])
            await q.run("migrate-set-parameters", **{"max-bandwidth": q_cfg.migrate_max_bandwidth})
            with _opened(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL) as fd:
                await q.send_fd(fd, "state")
                await q.run("migrate", uri="fd:state")
                await q.wait_migration(q_cfg.command_timeout_s)
        t_saved = time.monotonic()
        snapshot = await self._seal_snapshot(dest, state, kind)
        t_end = time.monotonic()
        self.timings.update(
            stop=t_stop - t0, save=t_saved - t_stop, sync=t_end - t_saved, snapshot=t_end - t0
        )
        log.info(
            "snapshot of %r into %s: %d bytes in %.3f s", self, dest, snapshot.meta.state_bytes, t_end - t0
        )
        return snapshot

    async def destroy(self) -> None:
        t0 = time.monotonic()
        q_cfg = self.driver.config
        if self.process.alive():
            with contextlib.suppress(WrenboxError):
                async with self._session(connect_timeout=1.0) as q:
                    await q.run("quit", timeout=q_cfg.quit_timeout_s)
        # Also reaps it (if it is our child), however it ended.
        if not await anyio.to_thread.run_sync(self.process.wait_gone, q_cfg.quit_timeout_s):
            log.warning("%r ignored quit; terminating it", self)
            await anyio.to_thread.run_sync(self.process.terminate, q_cfg.kill_grace_s)
        await _tidy(self)
        self.timings["quit"] = time.monotonic() - t0

    async def _monitor_up(self) -> None:
        """Wait for a booting QEMU's monitor (the guest runs from then on)."""
        t0 = time.monotonic()
        async with self._session(self.driver.config.start_timeout_s):
            pass
        self.timings["qmp"] = time.monotonic() - t0

    async def _load(self, snapshot: Snapshot) -> None:
        """Feed a restoring QEMU (``-incoming defer``) its state and start the vCPUs."""
        t0 = time.monotonic()
        async with self._session(self.driver.config.start_timeout_s) as q:
            t_qmp = time.monotonic()
            await q.run("migrate-set-capabilities", capabilities=[IGNORE_SHARED])
            with _opened(snapshot.state_path, os.O_RDONLY) as fd:
                await q.send_fd(fd, "state")
                await q.run("migrate-incoming", uri="fd:state")
                status = await q.wait_status(
                    {"paused", "running"},
                    passing={"inmigrate", "prelaunch"},
                    timeout=self.driver.config.command_timeout_s,
                )
            t_load = time.monotonic()
            if status == "paused":
                await q.run("cont")
        t_end = time.monotonic()
        self.timings.update(qmp=t_qmp - t0, load=t_load - t_qmp, cont=t_end - t_load)


@contextlib.contextmanager
def _opened(path: Path, flags: int) -> Iterator[int]:
    """A descriptor for QEMU (our copy closed when the block ends; QEMU holds its own)."""
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)


def _existing_dir(path: Path) -> Path:
    path = Path(path).absolute()
    if not path.is_dir():
        raise NotFound(f"snapshot directory {path} does not exist")
    return path


class QemuDriver(Driver):
    name = "qemu"
    confines = True

    def __init__(self, config: QemuConfig | None = None) -> None:
        self.config = config or QemuConfig()
        self._version: str | None = None

    async def version(self) -> str:
        """The QEMU version (``7.2.22``), asked of the binary once."""
        if self._version is None:
            done = await arun([self.config.binary, "--version"], timeout=self.config.command_timeout_s)
            found = _VERSION.search(done.stdout)
            if found is None:
                raise Unsupported(f"cannot tell the version of {self.config.binary}: {done.text.strip()!r}")
            self._version = found.group(1).decode()
        return self._version

    def pinned(self, machine: Machine) -> dict[str, object]:
        """What a snapshot taken by this driver fixes: the machine plus accelerator, CPU model, layout."""
        return {
            **machine.pinned(),
            "accel": self.config.accel,
            "cpu": "max" if self.config.accel == "tcg" else "host",
            "layout": MACHINE_LAYOUT,
        }

    async def boot(self, config: VmConfig) -> QemuVm:
        return await self._start(config, qemu_argv(config, self.config, incoming=False), QemuVm._monitor_up)

    async def restore(self, config: VmConfig, snapshot: Snapshot) -> QemuVm:
        snapshot.check_restorable(self.name, await self.version(), self.pinned(config.machine))
        if isinstance(config.memory, MemoryFile) and not config.memory.path.is_file():
            raise NotFound(f"guest RAM file {config.memory.path} of snapshot {snapshot.dir} does not exist")
        argv = qemu_argv(config, self.config, incoming=True)
        return await self._start(config, argv, lambda vm: vm._load(snapshot))

    def adopt(self, config: VmConfig, process: ProcessRef) -> QemuVm:
        return QemuVm(self, config, process, [])

    async def _start(
        self, config: VmConfig, argv: list[str], bring_up: Callable[[QemuVm], Awaitable[None]]
    ) -> QemuVm:
        """Spawn QEMU (in the VM's network namespace) and ``bring_up`` the VM; kill it if that fails."""
        run_dir = config.run_dir
        socket = run_dir / QMP_SOCKET
        if len(os.fsencode(socket)) > _SUN_PATH_MAX:
            raise InvalidArgument(f"run directory {run_dir} is too long for a unix socket path")
        if config.netns is not None and not config.netns.exists():
            raise NotFound(f"network namespace {config.netns} does not exist")
        run_dir.mkdir(parents=True, exist_ok=True)
        socket.unlink(missing_ok=True)
        if config.confinement is not None:
            assert isinstance(config.memory, MemoryFile)
            spec = jail_for(config, config.confinement)
            await anyio.to_thread.run_sync(_enter, spec, config.memory.path)
            command = spec.argv(argv)
        elif config.netns is not None:
            command = [require_tool("nsenter"), f"--net={config.netns}", "--", *argv]
        else:
            command = argv
        t0 = time.monotonic()
        vm = QemuVm(self, config, spawn(command, log=run_dir / QEMU_LOG, env=_ENV), argv)
        vm.timings["spawn"] = time.monotonic() - t0
        try:
            await bring_up(vm)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await _kill(vm)
            raise
        vm.timings["start"] = time.monotonic() - t0
        log.info("started %r in %.3f s", vm, vm.timings["start"])
        return vm


async def _kill(vm: QemuVm) -> None:
    """End a VM that failed to start: no monitor handshake to wait for, straight to signals."""
    await anyio.to_thread.run_sync(vm.process.terminate, vm.driver.config.kill_grace_s)
    await _tidy(vm)


async def _tidy(vm: QemuVm) -> None:
    """What a gone QEMU leaves: its socket, its jail's (empty) mount point, and its cgroup (once its
    console keeper, which ends with QEMU, has left it too)."""
    vm.qmp_socket.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # gone already, or a jail that never started
        _jail_root(vm.config.run_dir).rmdir()
    confinement = vm.config.confinement
    if confinement is not None and confinement.cgroup is not None:
        try:
            await anyio.to_thread.run_sync(confinement.cgroup.remove, 2.0)
        except WrenboxError as exc:  # the sweep at the next start reclaims it
            log.warning("leaving the cgroup of %r: %s", vm, exc.message)
