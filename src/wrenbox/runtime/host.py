"""The host runtime: each lifecycle step of a sandbox, done with this machine's parts.

A sandbox holds, in the order it acquires them (the keys of its ``resources`` ledger):

``slot``      its network slot (namespace, tap, host IP)
``disk``      its copy-on-write root disk (a :class:`wrenbox.rootfs.Disk` record)
``memory``    the file its guest RAM lives in while it runs (on tmpfs by default)
``vm``        the VMM process (pid + start time; ``pause_token`` while a pause is being written)
``snapshot``  its paused state: a compact memory chain + the VMM's device state + a meta file

Pausing writes ``snapshot`` and gives back ``vm``, ``memory`` and ``slot``; resuming takes them again
from the snapshot, which stays: it is the parent the next pause diffs against. Every release is
idempotent, so the same call serves rollback, destroy, pause and crash recovery (:mod:`.recovery`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from wrenbox import faults
from wrenbox.envd import AsyncEnvdClient, EnvdConfig
from wrenbox.envd.config import ENVD_PORT
from wrenbox.errors import CorruptData, InvalidArgument, NotFound, WrenboxError
from wrenbox.fileio import clone_or_copy
from wrenbox.images import load_image
from wrenbox.ledger import Ledger
from wrenbox.memory.chain import Chain
from wrenbox.memory.format import HEADER_NAME
from wrenbox.memory.process import MemoryConfig, process_diff, process_full
from wrenbox.memory.writer import SnapshotWriter
from wrenbox.names import validate_sandbox_id
from wrenbox.network import Network, NetworkSlot, SlotAllocator
from wrenbox.pids import ProcessRef
from wrenbox.records import SandboxRecord, TemplateRecord
from wrenbox.rootfs import BaseImage, Disk
from wrenbox.runtime.sweep import sweep
from wrenbox.templates import Placement, Templates, agent_ready
from wrenbox.templates.store import MEMORY, ROOTFS, SNAPSHOT_DIR
from wrenbox.templates.vm import netns_path
from wrenbox.vmm.base import Drive, Machine, MemoryFile, Snapshot, Vm, VmConfig

__all__ = ["HostRuntime", "RuntimeConfig"]

log = logging.getLogger(__name__)

VM_STATE = "vm"  # the VMM's snapshot inside a sandbox snapshot directory
META = "sandbox.json"


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    sandboxes_dir: Path
    images_dir: Path
    memory_dir: Path = Path("/dev/shm/wrenbox")
    ready_timeout_s: float = 30.0
    disk_size_mib: int | None = None  # None: as large as the template's disk
    memory: MemoryConfig = field(default_factory=MemoryConfig)


class HostRuntime:
    """Implements :class:`wrenbox.manager.Runtime` with QEMU (or Firecracker), rootfs disks, network
    slots and compact memory snapshots."""

    def __init__(self, config: RuntimeConfig, *, network: Network, templates: Templates) -> None:
        self.config = config
        self.network = network
        self.templates = templates
        self.driver = templates.driver
        self.rootfs = templates.rootfs
        self.slots = SlotAllocator(network.config.capacity)
        self._vms: dict[str, Vm] = {}
        self._clients: dict[str, AsyncEnvdClient] = {}
        config.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        config.memory_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- where a sandbox's files are -------------------------------------------------------------------

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.config.sandboxes_dir / validate_sandbox_id(sandbox_id)

    def run_dir(self, sandbox_id: str) -> Path:
        return self.sandbox_dir(sandbox_id) / "run"

    def snapshot_dir(self, sandbox_id: str) -> Path:
        return self.sandbox_dir(sandbox_id) / "snapshot"

    def ram_file(self, sandbox_id: str) -> Path:
        return self.config.memory_dir / f"{validate_sandbox_id(sandbox_id)}.ram"

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self, rec: SandboxRecord, template: TemplateRecord, ledger: Ledger, *, cold: bool) -> str:
        tpl = self.templates.store.get(template.name)
        rec.access_token = rec.access_token or secrets.token_urlsafe(24)
        self.sandbox_dir(rec.id).mkdir(parents=True, exist_ok=True)
        slot = await self._take_slot(ledger)
        faults.point("create.slot")
        size = None if self.config.disk_size_mib is None else self.config.disk_size_mib << 20
        disk = await self.rootfs.create(tpl.rootfs_image(), rec.id, size)
        ledger.hold("disk", _dump(disk))
        faults.point("create.disk")
        ram = self.ram_file(rec.id)
        ledger.hold("memory", str(ram))
        placement = Placement(self.run_dir(rec.id), Drive(disk.path, disk.format), slot, ram)
        if cold:
            image = load_image(self.config.images_dir, tpl.manifest.image)
            vm = await self.templates.boot(image, tpl.machine(placement.disk), placement)
        else:
            vm = await self.templates.start(tpl, placement, init=False)
        self._adopted(rec, vm, ledger)
        faults.point("create.vm")
        # A template made from a sandbox carries that sandbox's agent token; the first /init rotates it.
        await self._init_agent(rec, slot, current_token=template.manifest.get("agent_token"))
        faults.point("create.init")
        return str(slot.host_ip)

    async def pause(self, rec: SandboxRecord, ledger: Ledger) -> None:
        vm = self._vm(rec)
        snap_dir = self.snapshot_dir(rec.id)
        token = secrets.token_hex(8)
        ledger.update("vm", {**rec.resources["vm"], "pause_token": token})
        await self._close_client(rec.id)
        t0 = time.monotonic()
        with SnapshotWriter(snap_dir, replace=True) as writer:
            ledger.on_failure("continue the VM", vm.resume)
            faults.point("pause.stop")
            (writer.path / VM_STATE).mkdir()
            await vm.snapshot(writer.path / VM_STATE)
            faults.point("pause.vmstate")
            await anyio.to_thread.run_sync(self._write_memory, rec.id, snap_dir, writer.path)
            faults.point("pause.memory")
            disk = await self.rootfs.persist(self._disk(rec))
            ledger.update("disk", _dump(disk))
            _write_json(writer.path / META, {"pause_token": token, "paused_at": time.time()})
            if "snapshot" not in rec.resources:  # a later pause never gives back the last good one
                ledger.hold("snapshot", str(snap_dir))
            writer.commit()
        faults.point("pause.committed")
        ledger.commit()
        log.info("sandbox %s written to disk in %.3f s", rec.id, time.monotonic() - t0)
        # The sandbox is on disk now; a failure below only leaves something to reclaim. Shielded: a
        # cancellation here would leave a half-destroyed VM under a sandbox that is neither paused nor
        # running.
        with anyio.CancelScope(shield=True):
            for key in ("vm", "memory", "slot", "checkpoint"):  # the checkpoint is superseded: dropped
                try:
                    await ledger.release(key)
                except Exception as exc:
                    log.error("sandbox %s paused, but its %s could not be released: %s", rec.id, key, exc)
                    ledger.leftovers.append(key)

    async def resume(self, rec: SandboxRecord, ledger: Ledger) -> str:
        snap_dir = self.snapshot_dir(rec.id)
        snapshot = Snapshot.load(snap_dir / VM_STATE)
        disk = await self.rootfs.restore(self._disk(rec))
        ledger.update("disk", _dump(disk))
        # The VM writes to its disk as soon as it runs: a resume that fails after that (or a host that
        # dies before the next pause) must put the disk back where this snapshot left it.
        await self.rootfs.checkpoint(disk)
        ledger.hold("checkpoint", {"snapshot": self._snapshot_token(rec.id)})
        faults.point("resume.disk")
        slot = await self._take_slot(ledger)
        faults.point("resume.slot")
        ram = self.ram_file(rec.id)
        ledger.hold("memory", str(ram))
        await anyio.to_thread.run_sync(_materialize, snap_dir, ram)
        faults.point("resume.memory")
        vm = await self.driver.restore(self.vm_config(rec, disk, slot), snapshot)
        self._adopted(rec, vm, ledger)
        faults.point("resume.vm")
        await agent_ready(vm, slot, timeout=self.config.ready_timeout_s, init=False)
        await self._init_agent(rec, slot)
        faults.point("resume.init")
        return str(slot.host_ip)

    async def snapshot(self, rec: SandboxRecord, dest: Path, ledger: Ledger) -> dict[str, Any]:
        """Template ``dest.name`` from a running sandbox (it keeps running) or a paused one."""
        parent = self.templates.store.get(rec.template)
        if dest.parent != self.templates.store.root:
            raise InvalidArgument(f"templates live in {self.templates.store.root}, not {dest.parent}")
        build = self.templates.store.root / f".build-{dest.name}-{secrets.token_hex(4)}"
        build.mkdir(parents=True)
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        try:
            (build / SNAPSHOT_DIR).mkdir()
            if "vm" in rec.resources:
                vm_snapshot, base = await self._snapshot_running(rec, build)
            else:
                vm_snapshot, base = await self._snapshot_paused(rec, build)
            faults.point("snapshot.write")
            timings["write"] = round(time.monotonic() - t0, 3)
            tpl = await self.templates.publish_derived(
                dest.name, build, parent, base=base, snapshot=vm_snapshot, timings=timings
            )
        finally:
            shutil.rmtree(build, ignore_errors=True)
        # The agent in the template's memory still holds this sandbox's token: children need it once.
        return {"size_bytes": _allocated(tpl.path), "parent": parent.name, "agent_token": rec.access_token}

    async def release(self, rec: SandboxRecord, key: str, value: Any) -> None:
        if key == "slot":
            slot = NetworkSlot.from_dict(value)
            await self.network.remove(slot)
            self.slots.release(slot.index)
        elif key == "disk":
            await self.rootfs.remove(Disk.model_validate(value))
        elif key == "memory":
            self.ram_file(rec.id).unlink(missing_ok=True)
        elif key == "vm":
            await self._destroy_vm(rec, value)
        elif key == "snapshot":
            await anyio.to_thread.run_sync(_rmtree, self.snapshot_dir(rec.id))
        elif key == "checkpoint":
            await self._settle_checkpoint(rec, value)
        else:
            raise CorruptData(f"sandbox {rec.id} records an unknown resource {key!r}")
        if not rec.resources.keys() - {key}:
            await anyio.to_thread.run_sync(_rmtree, self.sandbox_dir(rec.id))

    async def delete_template(self, template: TemplateRecord) -> None:
        with contextlib.suppress(NotFound):  # already gone: deleting is idempotent
            await anyio.to_thread.run_sync(self.templates.store.delete, template.name)

    def envd(self, rec: SandboxRecord) -> AsyncEnvdClient:
        client = self._clients.get(rec.id)
        if client is None:
            if rec.host_ip is None:
                raise NotFound(f"sandbox {rec.id} has no address")
            client = self._client(rec, rec.host_ip)
        return client

    def host_metrics(self, rec: SandboxRecord) -> dict[str, int | float]:
        """What the sandbox costs the host: VMM memory and CPU (while running), disk and snapshot bytes."""
        out: dict[str, int | float] = {}
        if "disk" in rec.resources:
            out["disk_bytes"] = _allocated_file(self._disk(rec).store)
        if "snapshot" in rec.resources:
            out["snapshot_bytes"] = _allocated(self.snapshot_dir(rec.id))
        if "memory" in rec.resources:
            out["ram_file_bytes"] = _allocated_file(self.ram_file(rec.id))
        vm = self.adopt(rec) if "vm" in rec.resources else None
        if vm is not None:
            out.update(_process_usage(vm.pid))
        return out

    # -- recovery after a restart (see wrenbox.manager.recovery) ---------------------------------------

    persistent = frozenset({"disk", "snapshot"})  # what a paused sandbox holds

    async def vm_state(self, rec: SandboxRecord) -> str:
        """``running``, ``paused`` (vCPUs stopped) or ``gone`` for the VM on record."""
        vm = self.adopt(rec)
        if vm is None:
            return "gone"
        try:
            status = await vm.status()
        except WrenboxError as exc:  # alive but not answering: useless, and release will end it
            log.warning("sandbox %s: VM %d does not answer its monitor: %s", rec.id, vm.pid, exc)
            return "gone"
        return "running" if status == "running" else "paused"

    async def continue_vm(self, rec: SandboxRecord) -> None:
        await self._vm(rec).resume()

    def revertible(self, rec: SandboxRecord) -> bool:
        """Whether giving back what only a live VM holds leaves a consistent paused sandbox: its disk
        has a checkpoint taken for the snapshot on disk, which releasing the checkpoint reverts to."""
        held = rec.resources.get("checkpoint")
        token = self._snapshot_token(rec.id)
        return held is not None and token is not None and held.get("snapshot") == token

    def pause_committed(self, rec: SandboxRecord) -> bool:
        """Whether the pause that was under way when wrenbox stopped had written its snapshot."""
        token = rec.resources.get("vm", {}).get("pause_token")
        return token is not None and self._snapshot_token(rec.id) == token

    def _snapshot_token(self, sandbox_id: str) -> str | None:
        """The token of the snapshot on disk (each pause writes a new one), None if there is none."""
        try:
            meta = json.loads((self.snapshot_dir(sandbox_id) / META).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return meta.get("pause_token")

    async def _settle_checkpoint(self, rec: SandboxRecord, value: dict[str, Any]) -> None:
        """Revert the disk if the snapshot the checkpoint was taken for is still the one on disk (the
        sandbox goes back to it); drop the checkpoint if a later pause superseded that snapshot."""
        if "disk" not in rec.resources:
            return
        disk = self._disk(rec)
        if value.get("snapshot") is not None and value.get("snapshot") == self._snapshot_token(rec.id):
            await self.rootfs.revert(disk)
        else:
            await self.rootfs.drop_checkpoint(disk)

    async def finish_resume(self, rec: SandboxRecord) -> str:
        """Complete a resume whose VM is up: wait for the agent, then ``/init`` it."""
        vm = self._vm(rec)
        slot = NetworkSlot.from_dict(rec.resources["slot"])
        await agent_ready(vm, slot, timeout=self.config.ready_timeout_s, init=False)
        await self._init_agent(rec, slot)
        return str(slot.host_ip)

    async def sweep(self, records: list[SandboxRecord]) -> dict[str, list[str]]:
        for rec in records:
            if "slot" in rec.resources:
                index = NetworkSlot.from_dict(rec.resources["slot"]).index
                if index not in self.slots.in_use():
                    self.slots.reserve(index)
        return await sweep(self, records)

    def template_names(self) -> list[tuple[str, str, int, int]]:
        """Published templates on disk: (name, path, vcpus, memory MiB)."""
        return [
            (t.name, str(t.path), t.manifest.vcpus, t.manifest.memory_mib)
            for t in self.templates.store.list()
        ]

    # -- helpers -----------------------------------------------------------------------------------------

    def vm_config(self, rec: SandboxRecord, disk: Disk, slot: NetworkSlot) -> VmConfig:
        machine = Machine(vcpus=rec.vcpus, memory_mib=rec.memory_mb, drives=(Drive(disk.path, disk.format),))
        return VmConfig(
            machine=machine,
            memory=MemoryFile(self.ram_file(rec.id)),
            run_dir=self.run_dir(rec.id),
            netns=netns_path(slot),
        )

    def adopt(self, rec: SandboxRecord) -> Vm | None:
        """A handle on the sandbox's VM process if it is still alive (after a manager restart)."""
        if rec.id in self._vms:
            return self._vms[rec.id]
        value = rec.resources.get("vm")
        if value is None or "slot" not in rec.resources or "disk" not in rec.resources:
            return None
        process = ProcessRef(int(value["pid"]), int(value["start_time"]))
        if not process.alive():
            return None
        slot = NetworkSlot.from_dict(rec.resources["slot"])
        vm = self.driver.adopt(self.vm_config(rec, self._disk(rec), slot), process)
        self._vms[rec.id] = vm
        return vm

    async def _take_slot(self, ledger: Ledger) -> NetworkSlot:
        slot = self.network.slot(self.slots.allocate())
        ledger.hold("slot", slot.to_dict())
        await self.network.create(slot)
        return slot

    def _adopted(self, rec: SandboxRecord, vm: Vm, ledger: Ledger) -> None:
        self._vms[rec.id] = vm
        ledger.hold("vm", {"pid": vm.process.pid, "start_time": vm.process.start_time})

    def _vm(self, rec: SandboxRecord) -> Vm:
        vm = self.adopt(rec)
        if vm is None:
            raise NotFound(f"sandbox {rec.id} has no running VM")
        return vm

    def _disk(self, rec: SandboxRecord) -> Disk:
        try:
            return Disk.model_validate(rec.resources["disk"])
        except KeyError:
            raise CorruptData(f"sandbox {rec.id} has no disk on record") from None

    def _client(self, rec: SandboxRecord, host_ip: str, *, token: str | None = None) -> AsyncEnvdClient:
        config = EnvdConfig(base_url=f"http://{host_ip}:{ENVD_PORT}", access_token=token or rec.access_token)
        client = self._clients[rec.id] = AsyncEnvdClient(config)
        return client

    async def _init_agent(
        self, rec: SandboxRecord, slot: NetworkSlot, *, current_token: str | None = None
    ) -> None:
        """Every start and resume: set the guest clock, reseed its CRNG, (re)state token and env."""
        await self._close_client(rec.id)
        client = self._client(rec, str(slot.host_ip), token=current_token)
        await client.init(env_vars=rec.env, access_token=rec.access_token)

    async def _close_client(self, sandbox_id: str) -> None:
        client = self._clients.pop(sandbox_id, None)
        if client is not None:
            with anyio.CancelScope(shield=True):
                await client.aclose()

    async def _destroy_vm(self, rec: SandboxRecord, value: dict[str, Any]) -> None:
        await self._close_client(rec.id)
        vm = self._vms.pop(rec.id, None)
        if vm is None:
            process = ProcessRef(int(value["pid"]), int(value["start_time"]))
            await anyio.to_thread.run_sync(process.terminate, 5.0)
        else:
            await vm.destroy()
        await anyio.to_thread.run_sync(_rmtree, self.run_dir(rec.id))

    def _write_memory(self, sandbox_id: str, snap_dir: Path, out: Path) -> None:
        """The RAM file as a compact chain in ``out``: a diff against the last pause, or Full."""
        ram = self.ram_file(sandbox_id)
        if (snap_dir / HEADER_NAME).exists():
            with Chain.open(snap_dir, verify=False) as parent:
                process_diff(ram, parent, out, config=self.config.memory)
        else:
            process_full(ram, out)

    async def _snapshot_running(self, rec: SandboxRecord, build: Path) -> tuple[Snapshot, BaseImage]:
        """Fork: stop the VM, copy its state, RAM and disk, continue it."""
        vm = self._vm(rec)
        try:
            snapshot = await vm.snapshot(build / SNAPSHOT_DIR)
            await anyio.to_thread.run_sync(clone_or_copy, self.ram_file(rec.id), build / MEMORY)
            base = await self.rootfs.flatten(self._disk(rec), build / ROOTFS)
        finally:
            with anyio.CancelScope(shield=True):
                await vm.resume()
        return snapshot, base

    async def _snapshot_paused(self, rec: SandboxRecord, build: Path) -> tuple[Snapshot, BaseImage]:
        snap_dir = self.snapshot_dir(rec.id)

        def copy() -> None:
            for item in (snap_dir / VM_STATE).iterdir():
                shutil.copy2(item, build / SNAPSHOT_DIR / item.name)
            _materialize(snap_dir, build / MEMORY)

        await anyio.to_thread.run_sync(copy)
        base = await self.rootfs.flatten(self._disk(rec), build / ROOTFS)
        return Snapshot.load(build / SNAPSHOT_DIR), base


def _dump(disk: Disk) -> dict[str, Any]:
    return disk.model_dump(mode="json")


def _materialize(snap_dir: Path, dest: Path) -> None:
    with Chain.open(snap_dir) as chain:  # verifies every diff file's checksum: never serve corruption
        chain.materialize(dest)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data))


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _allocated(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def _allocated_file(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def _process_usage(pid: int) -> dict[str, int | float]:
    """Resident memory and CPU time of a process, from /proc (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/statm", "rb") as f:
            resident_pages = int(f.read().split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    # After the command name: field 14 utime and 15 stime are at indices 11 and 12.
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    return {"vmm_rss_bytes": resident_pages * os.sysconf("SC_PAGE_SIZE"), "vmm_cpu_seconds": cpu}
