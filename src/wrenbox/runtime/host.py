"""The host runtime: each lifecycle step of a sandbox, done with this machine's parts.

A sandbox holds the :class:`~wrenbox.runtime.base.Resource` s it acquired (its ledger). Pausing writes
``snapshot`` and gives back ``vm``, ``memory`` and ``slot``; resuming takes them again from the
snapshot, which stays: it is the parent the next pause diffs against. Every release is idempotent, so the
same call serves rollback, destroy, pause and crash recovery (:mod:`.sweep` removes what no record names).
Where a sandbox's files are, and what its paused state holds, is :mod:`.files`'.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from wrenbox import faults
from wrenbox.envd import AsyncEnvdClient
from wrenbox.errors import Conflict, CorruptData, GuestError, NotFound, WrenboxError
from wrenbox.fileio import clone_or_copy, no_space_is_storage_full
from wrenbox.images import Image, load_image
from wrenbox.launch import Launcher, Placement, agent_client
from wrenbox.ledger import Ledger
from wrenbox.memory.process import MemoryConfig
from wrenbox.memory.writer import SnapshotWriter
from wrenbox.network import EgressPolicy, Network, NetworkSlot
from wrenbox.pids import ProcessRef
from wrenbox.records import SandboxRecord, TemplateRecord, TemplateState
from wrenbox.rootfs import Disk, RootfsBackend
from wrenbox.runtime.base import Inspection, Resource
from wrenbox.runtime.exits import ExitWatch
from wrenbox.runtime.files import SandboxFiles, allocated_file, new_pause
from wrenbox.runtime.sweep import sweep
from wrenbox.templates import Draft, Template, TemplateBuilder, TemplateLibrary
from wrenbox.vmm.base import Snapshot, Vm

__all__ = ["HostRuntime", "RuntimeConfig"]

log = logging.getLogger(__name__)

R = Resource
SYNC_TIMEOUT_S = 10.0  # a disk-only pause asks the guest to flush its page cache, if it answers in time


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    sandboxes_dir: Path
    images_dir: Path
    memory_dir: Path = Path("/dev/shm/wrenbox")
    memory: MemoryConfig = field(default_factory=MemoryConfig)


class HostRuntime:
    """Implements :class:`wrenbox.runtime.base.Runtime` with VMs from one launcher, root disks from one
    rootfs backend, slots from the network's pool and compact memory snapshots."""

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        network: Network,
        rootfs: RootfsBackend,
        launcher: Launcher,
        templates: TemplateLibrary,
    ) -> None:
        self.config = config
        self.network = network
        self.rootfs = rootfs
        self.launcher = launcher
        self.templates = templates
        self.builder = TemplateBuilder(templates, launcher=launcher, rootfs=rootfs, network=network)
        self.files = SandboxFiles(config.sandboxes_dir, config.memory_dir)
        self._vms: dict[str, Vm] = {}
        self._clients: dict[str, AsyncEnvdClient] = {}
        self._exits = ExitWatch()

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self, rec: SandboxRecord, template: TemplateRecord, ledger: Ledger, *, cold: bool) -> str:
        tpl = self.templates.get(template.name)
        rec.access_token = rec.access_token or secrets.token_urlsafe(24)
        self.files.sandbox_dir(rec.id).mkdir(parents=True, exist_ok=True)
        slot = await self._take_slot(rec, ledger)
        faults.point("create.slot")
        disk = await self.rootfs.create(tpl.rootfs_image(), rec.id)  # the template's size
        ledger.hold(R.DISK, disk.model_dump(mode="json"))
        faults.point("create.disk")
        ram = self.files.ram_file(rec.id)
        ledger.hold(R.MEMORY, str(ram))
        placement = self._placement(rec, disk, slot)
        # The agent in the template's memory demands the template's token (a build's bootstrap token, or
        # the token of the sandbox it was made from): it authenticates the first /init, which gives this
        # sandbox's agent a token of its own.
        agent = self._new_client(rec, slot, token=None if cold else tpl.manifest.agent_token)
        ledger.on_failure("close the agent client", self._close_client, rec.id)
        if cold:
            vm = await self._boot(rec, placement, self._image(tpl))
        else:
            await anyio.to_thread.run_sync(tpl.copy_memory, ram)
            vm = await self.launcher.restore(
                placement, tpl.snapshot(), vcpus=rec.vcpus, memory_mib=rec.memory_mb, agent=agent
            )
        faults.crash_point("create.started")  # the VM runs, but is not on record yet
        self._adopted(rec, vm, ledger)
        faults.point("create.vm")
        await self._init_agent(rec)
        faults.point("create.init")
        return str(slot.host_ip)

    async def pause(self, rec: SandboxRecord, ledger: Ledger, *, memory: bool) -> None:
        vm = self._vm(rec)
        if not memory:
            await self._sync_guest(rec)
        snap_dir = self.files.snapshot_dir(rec.id)
        token = secrets.token_hex(8)
        ledger.update(R.VM, {**rec.resources[R.VM], "pause_token": token})
        await self._close_client(rec.id)
        t0 = time.monotonic()
        with (
            no_space_is_storage_full(snap_dir.parent, f"pausing sandbox {rec.id}"),
            SnapshotWriter(snap_dir, replace=True) as writer,
        ):
            ledger.on_failure("continue the VM", vm.resume)
            faults.point("pause.stop")
            if memory:
                state = self.files.vm_state(writer.path)
                state.mkdir()
                await vm.snapshot(state)
                faults.point("pause.vmstate")
                write = self.files.write_memory
                await anyio.to_thread.run_sync(write, rec.id, writer.path, self.config.memory)
                faults.point("pause.memory")
            else:
                await vm.pause()  # QEMU flushes its disk caches when it stops the vCPUs
            disk = await self.rootfs.persist(self._disk(rec))
            ledger.update(R.DISK, disk.model_dump(mode="json"))
            self.files.write_pause_meta(writer.path, new_pause(memory, token))
            if R.SNAPSHOT not in rec.resources:  # a later pause never gives back the last good one
                ledger.hold(R.SNAPSHOT, str(snap_dir))
            writer.commit()
        faults.point("pause.committed")
        ledger.commit()
        log.info("sandbox %s written to disk in %.3f s", rec.id, time.monotonic() - t0)
        # The sandbox is on disk now; a failure below only leaves something to reclaim. Shielded: a
        # cancellation here would leave a half-destroyed VM under a sandbox that is neither paused nor
        # running.
        with anyio.CancelScope(shield=True):
            for key in (R.VM, R.MEMORY, R.SLOT, R.CHECKPOINT):  # the checkpoint is superseded: dropped
                try:
                    await ledger.release(key)
                except Exception as exc:
                    log.error("sandbox %s paused, but its %s could not be released: %s", rec.id, key, exc)
                    ledger.leftovers.append(key)
        faults.crash_point("pause.released")  # given back, but the record still says pausing

    async def resume(self, rec: SandboxRecord, ledger: Ledger, *, memory: bool) -> str:
        snap_dir = self.files.snapshot_dir(rec.id)
        meta = self.files.pause_meta(rec.id)
        if meta is None:
            raise CorruptData(f"sandbox {rec.id} is paused but has no snapshot in {snap_dir}")
        warm = memory and meta.memory
        snapshot = Snapshot.load(self.files.vm_state(snap_dir)) if warm else None
        image = None if warm else self._image(self.templates.get(rec.template))
        disk = await self.rootfs.restore(self._disk(rec))
        ledger.update(R.DISK, disk.model_dump(mode="json"))
        # The VM writes to its disk as soon as it runs: a resume that fails after that (or a host that
        # dies before the next pause) must put the disk back where this snapshot left it.
        await self.rootfs.checkpoint(disk)
        ledger.hold(R.CHECKPOINT, {"snapshot": meta.token})
        faults.point("resume.disk")
        slot = await self._take_slot(rec, ledger)
        faults.point("resume.slot")
        ram = self.files.ram_file(rec.id)
        ledger.hold(R.MEMORY, str(ram))
        placement = self._placement(rec, disk, slot)
        agent = self._new_client(rec, slot)
        ledger.on_failure("close the agent client", self._close_client, rec.id)
        if snapshot is not None:
            await anyio.to_thread.run_sync(self.files.materialize, rec.id, ram)
            faults.point("resume.memory")
            vm = await self.launcher.restore(
                placement, snapshot, vcpus=rec.vcpus, memory_mib=rec.memory_mb, agent=agent
            )
        else:
            assert image is not None
            vm = await self._boot(rec, placement, image)
        faults.crash_point("resume.started")  # the VM runs, but is not on record yet
        self._adopted(rec, vm, ledger)
        faults.point("resume.vm")
        self._rotate_if_copied(rec, ledger)
        await self._init_agent(rec)
        faults.point("resume.init")
        return str(slot.host_ip)

    async def snapshot(self, rec: SandboxRecord, name: str, ledger: Ledger) -> TemplateRecord:
        """Template ``name`` from a running sandbox (it keeps running) or a paused one."""
        parent = self.templates.get(rec.template)
        running = R.VM in rec.resources
        meta = self.files.pause_meta(rec.id)
        if not running and meta is not None and not meta.memory:
            raise Conflict(
                f"sandbox {rec.id} was paused without its memory; resume it to snapshot it into a template"
            )
        t0 = time.monotonic()
        with no_space_is_storage_full(self.templates.root, f"template {name} from sandbox {rec.id}"):
            async with self.templates.derive(name, parent, source=rec.id) as draft:
                if running:
                    await self._snapshot_running(rec, draft)
                else:
                    await self._snapshot_paused(rec, draft)
                faults.point("snapshot.write")
                draft.timings["write"] = round(time.monotonic() - t0, 3)
                # The agent in the template's memory still holds this sandbox's token: children need it once,
                # for their first /init; this sandbox gets a new one when it next resumes.
                draft.agent_token = rec.access_token
        faults.point("snapshot.published")  # complete on disk; the manager has not recorded it yet
        assert draft.template is not None
        return _template_record(draft.template)

    async def release(self, rec: SandboxRecord, key: str, value: Any) -> None:
        releasers: dict[str, Callable[[SandboxRecord, Any], Any]] = {
            R.SLOT: self._release_slot,
            R.DISK: self._release_disk,
            R.MEMORY: self._release_memory,
            R.VM: self._destroy_vm,
            R.SNAPSHOT: self._release_snapshot,
            R.CHECKPOINT: self._settle_checkpoint,
        }
        releaser = releasers.get(key)
        if releaser is None:
            raise CorruptData(f"sandbox {rec.id} records an unknown resource {key!r}")
        await releaser(rec, value)
        if not rec.resources.keys() - {key}:
            await anyio.to_thread.run_sync(self.files.remove, self.files.sandbox_dir(rec.id))

    def envd(self, rec: SandboxRecord) -> AsyncEnvdClient:
        client = self._clients.get(rec.id)
        if client is None:  # a sandbox adopted after a restart
            if rec.host_ip is None:
                raise NotFound(f"sandbox {rec.id} has no address")
            slot = NetworkSlot.from_dict(rec.resources[R.SLOT])
            client = self._new_client(rec, slot)
        return client

    def usage(self, rec: SandboxRecord) -> dict[str, int | float]:
        """What the sandbox costs the host: VMM memory and CPU (while running), its RAM file, disk and
        snapshot bytes, and for a paused sandbox how much guest memory its snapshot holds."""
        out: dict[str, int | float] = {}
        if R.DISK in rec.resources:
            out["disk_bytes"] = allocated_file(self._disk(rec).store)
        if R.SNAPSHOT in rec.resources:
            out.update(self.files.snapshot_usage(rec.id))
        if R.MEMORY in rec.resources:
            out["ram_file_bytes"] = allocated_file(self.files.ram_file(rec.id))
        vm = self._adopt(rec) if R.VM in rec.resources else None
        if vm is not None:
            out.update(_process_usage(vm.pid))
        return out

    # -- templates ---------------------------------------------------------------------------------------

    def list_templates(self) -> list[TemplateRecord]:
        return [_template_record(t) for t in self.templates.list()]

    async def build_template(
        self,
        name: str,
        *,
        image: str,
        vcpus: int,
        memory_mb: int,
        disk_mb: int,
        on_step: Callable[[str], None] | None = None,
    ) -> TemplateRecord:
        built = await self.builder.build(
            name,
            load_image(self.config.images_dir, image),
            vcpus=vcpus,
            memory_mib=memory_mb,
            disk_mib=disk_mb,
            on_step=on_step,
        )
        return _template_record(built)

    async def delete_template(self, name: str) -> None:
        with contextlib.suppress(NotFound):  # already gone: deleting is idempotent
            await anyio.to_thread.run_sync(self.templates.delete, name)

    # -- recovery after a restart (see wrenbox.manager.recovery) -----------------------------------------

    async def inspect(self, rec: SandboxRecord) -> Inspection:
        pause_token = rec.resources.get(R.VM, {}).get("pause_token")
        on_disk = self._snapshot_token(rec.id)
        held = rec.resources.get(R.CHECKPOINT)
        vm = self._adopt(rec)
        alive = vm is not None and vm.alive()
        return Inspection(
            vm=await self._vm_state(rec, vm if alive else None),
            exited=R.VM in rec.resources and not alive,
            pause_committed=pause_token is not None and pause_token == on_disk,
            # The disk has a checkpoint taken for the snapshot on disk, which releasing it reverts to.
            revertible=held is not None and on_disk is not None and held.get("snapshot") == on_disk,
        )

    async def continue_vm(self, rec: SandboxRecord) -> None:
        await self._vm(rec).resume()

    async def finish_resume(self, rec: SandboxRecord) -> str:
        vm = self._vm(rec)
        slot = NetworkSlot.from_dict(rec.resources[R.SLOT])
        await self._close_client(rec.id)
        await self.launcher.wait_for_agent(vm, self._new_client(rec, slot))
        await self._init_agent(rec)
        return str(slot.host_ip)

    async def sweep(self, records: list[SandboxRecord]) -> dict[str, list[str]]:
        return await sweep(self, records)

    # -- watching running sandboxes ----------------------------------------------------------------------

    async def watch_vms(self, lost: Callable[[str], Awaitable[None]]) -> None:
        """Call ``lost(sandbox_id)`` as soon as a sandbox's VMM exits without wrenbox ending it (each
        call in a task of its own); runs until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                async for sandbox_id in self._exits.exits():
                    tg.start_soon(_logged, lost, sandbox_id)
        finally:
            self._exits.close()

    async def check_agent(self, rec: SandboxRecord) -> bool:
        """Initialise the running sandbox's agent again if it lost its state (it was restarted in the
        guest, by its init, with no token, env or clock of the sandbox's); True if it had to."""
        if await self.envd(rec).initialised():
            return False
        await self._init_agent(rec)
        return True

    async def repair_host(self) -> list[str]:
        """Put back what the host's sandboxes depend on and someone removed; names what was repaired."""
        repaired = await self.network.ensure_host_table()
        return [f"nftables table inet {self.network.config.prefix}"] if repaired else []

    # -- helpers -----------------------------------------------------------------------------------------

    def _placement(self, rec: SandboxRecord, disk: Disk, slot: NetworkSlot) -> Placement:
        return Placement(self.files.run_dir(rec.id), disk.drive(), slot, self.files.ram_file(rec.id))

    def _image(self, tpl: Template) -> Image:
        """The image a template was built from, to cold-boot its sandboxes."""
        image = load_image(self.config.images_dir, tpl.manifest.image)
        if image.manifest.kernel.release != tpl.manifest.kernel_release:
            log.warning(
                "template %s was built on kernel %s; image %s now has %s",
                tpl.name,
                tpl.manifest.kernel_release,
                image.name,
                image.manifest.kernel.release,
            )
        return image

    async def _boot(self, rec: SandboxRecord, placement: Placement, image: Image) -> Vm:
        return await self.launcher.boot(
            placement, image, vcpus=rec.vcpus, memory_mib=rec.memory_mb, agent=self._clients[rec.id]
        )

    async def _vm_state(self, rec: SandboxRecord, vm: Vm | None) -> str:
        """``vm``: the sandbox's live VM, if it has one."""
        if vm is None:
            return "gone"
        try:
            status = await vm.status()
        except WrenboxError as exc:  # alive but not answering: useless, and release will end it
            log.warning("sandbox %s: VM %d does not answer its monitor: %s", rec.id, vm.pid, exc)
            return "gone"
        return "running" if status == "running" else "paused"

    def _adopt(self, rec: SandboxRecord) -> Vm | None:
        """A handle on the sandbox's VM process if it is still alive (after a manager restart)."""
        if rec.id in self._vms:
            return self._vms[rec.id]
        value = rec.resources.get(R.VM)
        if value is None or R.SLOT not in rec.resources or R.DISK not in rec.resources:
            return None
        process = ProcessRef(int(value["pid"]), int(value["start_time"]))
        if not process.alive():
            return None
        placement = self._placement(rec, self._disk(rec), NetworkSlot.from_dict(rec.resources[R.SLOT]))
        vm = self.launcher.adopt(placement, process, vcpus=rec.vcpus, memory_mib=rec.memory_mb)
        self._vms[rec.id] = vm
        self._exits.watch(rec.id, process)
        return vm

    def _vm(self, rec: SandboxRecord) -> Vm:
        vm = self._adopt(rec)
        if vm is None:
            raise NotFound(f"sandbox {rec.id} has no running VM")
        return vm

    def _disk(self, rec: SandboxRecord) -> Disk:
        try:
            return Disk.model_validate(rec.resources[R.DISK])
        except KeyError:
            raise CorruptData(f"sandbox {rec.id} has no disk on record") from None

    def _snapshot_token(self, sandbox_id: str) -> str | None:
        """The token of the snapshot on disk (each pause writes a new one), None if there is none."""
        meta = self.files.pause_meta(sandbox_id)
        return None if meta is None else meta.token

    async def _take_slot(self, rec: SandboxRecord, ledger: Ledger) -> NetworkSlot:
        slot = self.network.reserve()
        ledger.hold(R.SLOT, slot.to_dict())  # written down before it exists: a crash leaves a known slot
        await self.network.create(slot, _egress(rec))
        return slot

    async def set_egress(self, rec: SandboxRecord) -> None:
        await self.network.set_egress(NetworkSlot.from_dict(rec.resources[R.SLOT]), _egress(rec))

    def _adopted(self, rec: SandboxRecord, vm: Vm, ledger: Ledger) -> None:
        self._vms[rec.id] = vm
        ledger.hold(R.VM, {"pid": vm.process.pid, "start_time": vm.process.start_time})
        self._exits.watch(rec.id, vm.process)

    def _new_client(
        self, rec: SandboxRecord, slot: NetworkSlot, *, token: str | None = None
    ) -> AsyncEnvdClient:
        """The sandbox's one agent client from now on (for a VM that is starting: a previous VM's client
        went with that VM)."""
        client = self._clients[rec.id] = agent_client(slot, token or rec.access_token)
        return client

    async def _init_agent(self, rec: SandboxRecord) -> None:
        """Every start and resume: set the guest clock, reseed its CRNG, (re)state env and token; a new
        token (``next_token`` on the VM's record, see :meth:`_rotate_if_copied`) becomes the sandbox's."""
        token = rec.resources.get(R.VM, {}).get("next_token", rec.access_token)
        try:
            await self._clients[rec.id].init(env_vars=rec.env, access_token=token)
        except GuestError as exc:  # the agent refusing a token: a code it may report, not the caller's error
            if exc.guest_code != "unauthenticated" or token == rec.access_token:
                raise
            # The agent took the new token already, and a crash came before the record said so.
            await self._close_client(rec.id)
            client = self._new_client(rec, NetworkSlot.from_dict(rec.resources[R.SLOT]), token=token)
            await client.init(env_vars=rec.env, access_token=token)
        rec.access_token = token

    def _rotate_if_copied(self, rec: SandboxRecord, ledger: Ledger) -> None:
        """A new agent token for a resuming sandbox whose token a template holds (made from it since it
        last got one): every sandbox restored from that template started with it, so it is no longer
        this sandbox's secret. The old one authenticates the /init that sets it; until the resume is
        done the new one waits on the VM's record, so a crash in between leaves both known."""
        if rec.access_token is None or not self.templates.holding_token(rec.access_token):
            return
        ledger.update(R.VM, {**rec.resources[R.VM], "next_token": secrets.token_urlsafe(24)})
        # A resume that fails goes back to the snapshot, whose agent holds the old token.
        ledger.on_failure(
            "keep the token of the snapshot's agent", setattr, rec, "access_token", rec.access_token
        )

    async def _sync_guest(self, rec: SandboxRecord) -> None:
        """Ask the guest to write its dirty page cache to its disk (before a pause that keeps only the
        disk). A guest that does not answer in time is paused anyway: the disk is then as after a power
        cut, which its journal recovers from."""
        try:
            with anyio.fail_after(SYNC_TIMEOUT_S):
                await self.envd(rec).processes.exec(["sync"], user="root", timeout=SYNC_TIMEOUT_S)
        except (WrenboxError, TimeoutError) as exc:
            log.warning("sandbox %s: the guest did not sync its disk before the pause: %s", rec.id, exc)

    async def _close_client(self, sandbox_id: str) -> None:
        client = self._clients.pop(sandbox_id, None)
        if client is not None:
            with anyio.CancelScope(shield=True):
                await client.aclose()

    # -- releases ----------------------------------------------------------------------------------------

    async def _release_slot(self, rec: SandboxRecord, value: Any) -> None:
        await self.network.give_back(NetworkSlot.from_dict(value))

    async def _release_disk(self, rec: SandboxRecord, value: Any) -> None:
        await self.rootfs.remove(Disk.model_validate(value))

    async def _release_memory(self, rec: SandboxRecord, value: Any) -> None:
        self.files.ram_file(rec.id).unlink(missing_ok=True)

    async def _release_snapshot(self, rec: SandboxRecord, value: Any) -> None:
        await anyio.to_thread.run_sync(self.files.remove, self.files.snapshot_dir(rec.id))

    async def _destroy_vm(self, rec: SandboxRecord, value: dict[str, Any]) -> None:
        self._exits.unwatch(rec.id)  # ended on purpose from here on: not an exit to report
        await self._close_client(rec.id)
        vm = self._vms.pop(rec.id, None)
        if vm is None:
            process = ProcessRef(int(value["pid"]), int(value["start_time"]))
            await anyio.to_thread.run_sync(process.terminate, 5.0)
        else:
            await vm.destroy()
        await anyio.to_thread.run_sync(self.files.remove, self.files.run_dir(rec.id))

    async def _settle_checkpoint(self, rec: SandboxRecord, value: dict[str, Any]) -> None:
        """Revert the disk if the snapshot the checkpoint was taken for is still the one on disk (the
        sandbox goes back to it); drop the checkpoint if a later pause superseded that snapshot."""
        if R.DISK not in rec.resources:
            return
        disk = self._disk(rec)
        on_disk = self._snapshot_token(rec.id)
        if value.get("snapshot") is not None and value.get("snapshot") == on_disk:
            await self.rootfs.revert(disk)
        else:
            await self.rootfs.drop_checkpoint(disk)

    # -- templates from sandboxes ----------------------------------------------------------------------

    async def _snapshot_running(self, rec: SandboxRecord, draft: Draft) -> None:
        """Fork: stop the VM, copy its state, RAM and disk, continue it."""
        vm = self._vm(rec)
        try:
            await vm.snapshot(draft.snapshot_dir)
            await anyio.to_thread.run_sync(clone_or_copy, self.files.ram_file(rec.id), draft.memory)
            draft.rootfs_image = await self.rootfs.flatten(self._disk(rec), draft.rootfs)
        finally:
            with anyio.CancelScope(shield=True):
                await vm.resume()

    async def _snapshot_paused(self, rec: SandboxRecord, draft: Draft) -> None:
        copy = self.files.copy_paused_state
        await anyio.to_thread.run_sync(copy, rec.id, draft.snapshot_dir, draft.memory)
        draft.rootfs_image = await self.rootfs.flatten(self._disk(rec), draft.rootfs)


async def _logged(lost: Callable[[str], Awaitable[None]], sandbox_id: str) -> None:
    try:
        await lost(sandbox_id)
    except Exception:  # one sandbox's settling must not stop the watch over the others
        log.exception("settling sandbox %s after its VMM exited failed", sandbox_id)


def _egress(rec: SandboxRecord) -> EgressPolicy:
    return EgressPolicy(allow=tuple(rec.egress.get("allow", ())), deny=tuple(rec.egress.get("deny", ())))


def _template_record(tpl: Template) -> TemplateRecord:
    m = tpl.manifest
    return TemplateRecord(
        name=tpl.name,
        kind="base" if m.parent is None else "snapshot",
        path=str(tpl.path),
        vcpus=m.vcpus,
        memory_mb=m.memory_mib,
        disk_mb=tpl.rootfs_image().size >> 20,
        state=TemplateState.READY,
        source=m.source or m.image,
        parent=m.parent,
        size_bytes=tpl.size_bytes(),
        created_at=m.created_at.timestamp(),
    )


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
