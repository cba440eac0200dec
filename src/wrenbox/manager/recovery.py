"""Starting after a crash: settle every sandbox a previous run left in the middle of an operation.

Each transitional state has one safe ending, decided from what is on record and what is still alive:

==============  ===================================================================================
creating        give back everything → destroyed (the caller never got an answer)
stopping        give back everything → destroyed
running         VM alive → adopted (continued if a crash left it stopped); VM gone → "lost" (below)
pausing         snapshot committed → finish the pause → paused; else VM alive → continued → running;
                else → "lost"
resuming        VM up and running → finish (agent, /init) → running; else back to paused, snapshot intact
snapshotting    the half-built template is dropped; a fork's source continues → running, else paused
==============  ===================================================================================

"Lost": the VM is gone (the host rebooted, someone killed it). If the sandbox was resumed from a pause,
its disk has a checkpoint taken for that pause: the disk goes back to it and the sandbox is paused
again, consistent, having lost only what happened since that resume. A sandbox never paused has no
such state to go back to and ends in error.

Paused sandboxes are never touched: their state is on disk. After the per-sandbox endings, a sweep
removes whatever no record names (:func:`wrenbox.runtime.sweep.sweep`), and template rows are
brought in line with the templates on disk.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from wrenbox.records import SandboxRecord, SandboxState, TemplateRecord, TemplateState

if TYPE_CHECKING:
    from wrenbox.manager.store import Store

__all__ = ["RecoveryMixin"]

log = logging.getLogger(__name__)
S = SandboxState


class RecoveryMixin:
    """The manager's start-up recovery (mixed into :class:`wrenbox.manager.SandboxManager`)."""

    store: Store
    runtime: Any

    async def recover(self) -> dict[str, Any]:
        """Settle interrupted sandboxes, sync template rows, sweep the host. Call once, before serving."""
        settled = {}
        unsettled = set(SandboxState) - {S.DESTROYED, S.PAUSED, S.ERROR}
        for rec in self.store.list_sandboxes(states=unsettled):
            before = rec.state
            try:
                await self._recover_one(rec)
            except Exception as exc:
                log.exception("recovery of sandbox %s (%s) failed", rec.id, before.value)
                rec = self.store.get_sandbox(rec.id)
                if rec.state is not S.ERROR:
                    self._move(rec, S.ERROR, error=f"recovery after a restart failed: {exc}")
            settled[rec.id] = f"{before.value} -> {self.store.get_sandbox(rec.id).state.value}"
        self._sync_templates()
        swept = await self.runtime.sweep(self.store.list_sandboxes(states=set(S) - {S.DESTROYED}))
        self.store.record_event("recovered", None, sandboxes=settled, swept=swept)
        return {"sandboxes": settled, "swept": swept}

    async def _recover_one(self, rec: SandboxRecord) -> None:
        rt = self.runtime
        if rec.state in (S.CREATING, S.STOPPING):
            leftovers = await self._release(rec, rec.resources)
            target = S.ERROR if leftovers else S.DESTROYED
            self._move(rec, target, leftovers=leftovers, host_ip=None)
        elif rec.state is S.RUNNING:
            vm = await rt.vm_state(rec)
            if vm == "paused":
                await rt.continue_vm(rec)
            elif vm == "gone":
                await self._vm_lost(rec)
        elif rec.state is S.PAUSING:
            if rt.pause_committed(rec):
                await self._back_to_disk(rec, S.PAUSED)
            elif await rt.vm_state(rec) != "gone":
                await rt.continue_vm(rec)
                self._move(rec, S.RUNNING, error="a pause was interrupted by a restart; still running")
            else:
                await self._vm_lost(rec)
        elif rec.state is S.RESUMING:
            if await rt.vm_state(rec) == "running":
                host_ip = await rt.finish_resume(rec)
                self._move(rec, S.RUNNING, host_ip=host_ip)
            else:
                await self._back_to_disk(rec, S.PAUSED)
        elif rec.state is S.SNAPSHOTTING:
            if "vm" not in rec.resources:
                self._move(rec, S.PAUSED)
            elif await rt.vm_state(rec) != "gone":
                await rt.continue_vm(rec)
                self._move(rec, S.RUNNING)
            else:
                await self._vm_lost(rec)

    async def _vm_lost(self, rec: SandboxRecord) -> None:
        """The VM is gone (the host rebooted, it was killed): back to the last pause if the disk can go
        back with it, else error (a sandbox never paused has nothing to go back to)."""
        if self.runtime.revertible(rec):
            error = "the VM was lost while wrenbox was not running; back to the state of the last pause"
            await self._back_to_disk(rec, S.PAUSED, error=error)
        else:
            error = "the VM was lost while wrenbox was not running and the sandbox was never paused"
            await self._back_to_disk(rec, S.ERROR, error=error)

    async def _back_to_disk(self, rec: SandboxRecord, target: SandboxState, **changes: Any) -> None:
        """Give back what only a live VM holds, keep the disk and snapshot, and move to ``target``."""
        transient = {k: v for k, v in rec.resources.items() if k not in self.runtime.persistent}
        leftovers = await self._release(rec, transient)
        if leftovers:
            target = S.ERROR
            changes.setdefault("error", "some resources could not be released after a restart")
        self._move(rec, target, leftovers=leftovers, host_ip=None, **changes)

    async def _release(self, rec: SandboxRecord, resources: dict[str, Any]) -> list[str]:
        leftovers = []
        for key in reversed(list(resources)):
            try:
                await self.runtime.release(rec, key, rec.resources[key])
            except Exception as exc:
                log.error("sandbox %s: could not release %s: %s", rec.id, key, exc)
                leftovers.append(key)
                continue
            del rec.resources[key]
            self.store.save_sandbox(rec)
        return leftovers

    def _sync_templates(self) -> None:
        """Template rows follow the published templates on disk; a half-built one is never listed."""
        on_disk = {name: (path, vcpus, mem) for name, path, vcpus, mem in self.runtime.template_names()}
        for tpl in self.store.list_templates():
            if tpl.state is not TemplateState.READY or tpl.name not in on_disk:
                if tpl.state is TemplateState.READY and self.store.template_users(tpl.name):
                    log.error("template %s is in use but its files are gone", tpl.name)
                    continue
                self.store.delete_template(tpl.name)
        known = {t.name for t in self.store.list_templates()}
        for name, (path, vcpus, mem) in on_disk.items():
            if name not in known:
                self.store.insert_template(
                    TemplateRecord(
                        name=name,
                        kind="base",
                        path=path,
                        vcpus=vcpus,
                        memory_mb=mem,
                        state=TemplateState.READY,
                    )
                )

    # provided by SandboxManager
    def _move(self, rec: SandboxRecord, target: SandboxState, **changes: Any) -> SandboxRecord:
        raise NotImplementedError
