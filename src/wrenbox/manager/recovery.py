"""Starting after a crash: settle every sandbox a previous run left in the middle of an operation.

Each transitional state has one safe ending, decided from what is on record and what is still alive:

==============  ===================================================================================
creating        give back everything → destroyed (the caller never got an answer)
stopping        give back everything → destroyed
running         VM alive → adopted (continued if a crash left it stopped); VM gone → "lost" (below)
pausing         snapshot committed (or the VM already given back, which a pause does only after its
                commit) → finish the pause → paused; else VM alive → continued → running;
                else → "lost"
resuming        VM up and running → finish (agent, /init) → running; else back to paused, snapshot intact
snapshotting    the half-built template is dropped; a fork's source continues → running, else paused
==============  ===================================================================================

"Lost": the VM is gone (the host rebooted, someone killed it). If the sandbox was resumed from a pause,
its disk has a checkpoint taken for that pause: the disk goes back to it and the sandbox is paused
again, consistent, having lost only what happened since that resume. A sandbox never paused has no
such state to go back to and ends in error (keeping its disk until it is destroyed). Either way
everything only the VM held (its process, slot, RAM file, cgroup, agent client) is given back. The same
rule settles a VM lost while wrenbox runs (its VMM exited: :meth:`SandboxManager.watch_vms`).

Paused sandboxes are never touched: their state is on disk. Before and after the per-sandbox endings, a
sweep removes whatever no record names (:func:`wrenbox.runtime.sweep.sweep`), template rows are brought
in line with the templates on disk, and a fork template no sandbox uses (the crash came before its
children, or during the first) is deleted, as a fork that failed deletes it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from wrenbox.records import SandboxRecord, SandboxState
from wrenbox.runtime.base import Resource

if TYPE_CHECKING:
    from wrenbox.manager.catalog import TemplateCatalog
    from wrenbox.manager.store import Store
    from wrenbox.runtime.base import Runtime

__all__ = ["RecoveryMixin"]

log = logging.getLogger(__name__)
S = SandboxState
WHILE_DOWN = "while wrenbox was not running"


class RecoveryMixin:
    """The manager's start-up recovery, mixed into :class:`wrenbox.manager.manager.SandboxManager`.

    It needs the manager's store, runtime and template catalog, and four of its steps, declared below:
    ``_move`` (a persisted transition), ``_release`` (give back resources, newest first),
    ``_transient`` (what only a live VM holds) and ``_collect_template`` (delete an unused fork
    template)."""

    _store: Store
    _runtime: Runtime
    _catalog: TemplateCatalog

    async def recover(self) -> dict[str, Any]:
        """Settle interrupted sandboxes, sync template rows, sweep the host. Call once, before serving."""
        # First end what no record names: a VM started just before the crash, before its ledger entry
        # was written, still holds its disk's lock and its slot's cgroup, and settling the sandbox it
        # belongs to (giving back its checkpoint, say) would fail on them.
        early = await self._runtime.sweep(self._store.list_sandboxes(states=set(S) - {S.DESTROYED}))
        settled = {}
        unsettled = set(SandboxState) - {S.DESTROYED, S.PAUSED, S.ERROR}
        for rec in self._store.list_sandboxes(states=unsettled):
            before = rec.state
            try:
                await self._recover_one(rec)
            except Exception as exc:
                log.exception("recovery of sandbox %s (%s) failed", rec.id, before.value)
                rec = self._store.get_sandbox(rec.id)
                if rec.state is not S.ERROR:
                    self._move(rec, S.ERROR, error=f"recovery after a restart failed: {exc}")
            settled[rec.id] = f"{before.value} -> {self._store.get_sandbox(rec.id).state.value}"
        await self._catalog.sync()
        for template in self._catalog.list():  # a fork the crash cut short: no child uses its template
            await self._collect_template(template.name)
        late = await self._runtime.sweep(self._store.list_sandboxes(states=set(S) - {S.DESTROYED}))
        swept = {kind: early.get(kind, []) + late.get(kind, []) for kind in early.keys() | late.keys()}
        self._store.record_event("recovered", None, sandboxes=settled, swept=swept)
        return {"sandboxes": settled, "swept": swept}

    async def _recover_one(self, rec: SandboxRecord) -> None:
        rt = self._runtime
        # First, even for a sandbox about to be destroyed: a live VM is adopted, so that releasing it
        # ends it the way a VM this process started is ended (its cgroup and run files with it).
        seen = await rt.inspect(rec)
        if rec.state in (S.CREATING, S.STOPPING):
            leftovers = await self._release(rec, rec.resources)
            target = S.ERROR if leftovers else S.DESTROYED
            self._move(rec, target, leftovers=leftovers, host_ip=None)
            return
        if rec.state is S.RUNNING:
            if seen.vm == "paused":
                await rt.continue_vm(rec)
            elif seen.vm == "gone":
                await self._vm_lost(rec, revertible=seen.revertible, when=WHILE_DOWN)
        elif rec.state is S.PAUSING:
            # A pause gives back its VM only once its snapshot is committed, so a pausing sandbox without
            # one had committed (its pause token went with the VM's entry) and was giving back the rest.
            if seen.pause_committed or _vm_given_back(rec):
                await self._back_to_disk(rec, S.PAUSED)
            elif seen.vm != "gone":
                await rt.continue_vm(rec)
                self._move(rec, S.RUNNING, error="a pause was interrupted by a restart; still running")
            else:
                await self._vm_lost(rec, revertible=seen.revertible, when=WHILE_DOWN)
        elif rec.state is S.RESUMING:
            if seen.vm == "running":
                host_ip = await rt.finish_resume(rec)
                self._move(rec, S.RUNNING, host_ip=host_ip)
            else:
                await self._back_to_disk(rec, S.PAUSED)
        elif rec.state is S.SNAPSHOTTING:
            if Resource.VM not in rec.resources:  # it was snapshotting a paused sandbox
                self._move(rec, S.PAUSED)
            elif seen.vm != "gone":
                await rt.continue_vm(rec)
                self._move(rec, S.RUNNING)
            else:
                await self._vm_lost(rec, revertible=seen.revertible, when=WHILE_DOWN)

    async def _vm_lost(self, rec: SandboxRecord, *, revertible: bool, when: str) -> None:
        """The VM is gone (the host rebooted, it was killed ``when``): back to the last pause if the disk
        can go back with it, else error (a sandbox never paused has nothing to go back to)."""
        if revertible:
            error = f"the VM was lost {when}; back to the state of the last pause"
            await self._back_to_disk(rec, S.PAUSED, error=error)
        else:
            error = f"the VM was lost {when} and the sandbox was never paused"
            await self._back_to_disk(rec, S.ERROR, error=error)

    async def _back_to_disk(self, rec: SandboxRecord, target: SandboxState, **changes: Any) -> None:
        """Give back what only a live VM holds, keep the disk and snapshot, and move to ``target``."""
        leftovers = await self._release(rec, self._transient(rec))
        if leftovers:
            target = S.ERROR
            changes.setdefault("error", "some resources of its VM could not be released")
        self._move(rec, target, leftovers=leftovers, host_ip=None, **changes)

    # Steps of the manager's, declared here so the dependency is visible.

    def _move(self, rec: SandboxRecord, target: SandboxState, **changes: Any) -> SandboxRecord:
        raise NotImplementedError

    async def _release(self, rec: SandboxRecord, resources: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def _transient(self, rec: SandboxRecord) -> dict[str, Any]:
        raise NotImplementedError

    async def _collect_template(self, name: str) -> None:
        raise NotImplementedError


def _vm_given_back(rec: SandboxRecord) -> bool:
    return Resource.VM not in rec.resources and Resource.SNAPSHOT in rec.resources
