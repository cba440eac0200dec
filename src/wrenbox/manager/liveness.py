"""Sandboxes changing on their own while the manager runs: a VMM that exits (OOM-killed, crashed, killed
by an operator), a guest agent that restarted, the host's firewall table removed.

A VMM's exit is settled at once by recovery's rule for a lost VM (:meth:`RecoveryMixin._vm_lost`), so a
VM lost while wrenbox runs ends exactly as one lost while it was down. The rest is found by
:meth:`LivenessMixin.check_host`, which the reaper runs every few seconds.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from wrenbox.records import SandboxRecord, SandboxState

if TYPE_CHECKING:
    from wrenbox.manager.activity import Activity
    from wrenbox.manager.store import Store
    from wrenbox.runtime.base import Runtime

__all__ = ["AGENT_RESTARTED", "LivenessMixin"]

log = logging.getLogger(__name__)
S = SandboxState
WHILE_RUNNING = "while it ran (its VMM process exited)"
AGENT_CHECK_TIMEOUT_S = 5.0
AGENT_RESTARTED = "the guest agent restarted; processes started before it did are no longer tracked"


class LivenessMixin:
    """Mixed into :class:`wrenbox.manager.manager.SandboxManager` after :class:`RecoveryMixin` (whose
    ``_vm_lost`` it uses); it needs the manager's store, runtime, activity and per-sandbox locks, and the
    steps declared below."""

    _store: Store
    _runtime: Runtime
    _activity: Activity
    _running_since: dict[str, float]

    async def watch_vms(self) -> None:
        """Settle each sandbox whose VM exits on its own (OOM-killed, crashed, powered off) as it happens,
        exactly as :meth:`recover` settles a VM lost while wrenbox was down. Runs until cancelled."""
        await self._runtime.watch_vms(self._vm_exited)

    async def check_host(self) -> None:
        """Every few seconds (a reaper watch): put back the host's firewall table if someone removed it,
        and initialise again each running sandbox's agent that restarted in its guest (it comes back
        with no token, env or clock). Both are recorded as events; an agent's restart on the sandbox."""
        repaired = await self._runtime.repair_host()
        if repaired:
            self._store.record_event("host_repaired", None, repaired=repaired)
        for rec in self.list_running():
            lock = self._lock(rec.id)
            if lock.locked():
                continue  # a lifecycle operation is under way: looked at next time
            async with lock:
                await self._check_agent(rec.id)

    async def _vm_exited(self, sandbox_id: str) -> None:
        async with self._lock(sandbox_id):
            await self._settle_if_lost(self.get(sandbox_id))

    async def _settle_if_lost(self, rec: SandboxRecord) -> bool:
        """If ``rec`` is running (or was pausing) but its VMM has exited, settle it by the rule of
        :meth:`_vm_lost` (calls in flight on it fail at once, saying so); True if it was. A VMM that is
        alive but slow to answer is left alone. The caller holds the sandbox's lock."""
        if rec.state not in (S.RUNNING, S.PAUSING):
            return False
        seen = await self._runtime.inspect(rec)
        if not seen.exited:
            return False
        log.warning("sandbox %s: its VM is gone; settling it", rec.id)
        self._activity.cut(rec.id, "lost its VM")
        self._store.record_event("vm_lost", rec.id, revertible=seen.revertible)
        await self._vm_lost(rec, revertible=seen.revertible, when=WHILE_RUNNING)
        self._running_since.pop(rec.id, None)
        return True

    async def _check_agent(self, sandbox_id: str) -> None:
        """Initialise the sandbox's agent again if it restarted (caller holds the lock)."""
        rec = self.get(sandbox_id)
        if rec.state is not S.RUNNING:
            return
        try:
            with anyio.fail_after(AGENT_CHECK_TIMEOUT_S):
                restarted = await self._runtime.check_agent(rec)
        except Exception as exc:  # e.g. the agent is still starting up: looked at again next time
            log.warning("sandbox %s: could not check its guest agent: %s", sandbox_id, exc)
            return
        if restarted:
            log.warning("sandbox %s: %s; initialised it again", sandbox_id, AGENT_RESTARTED)
            rec.error = AGENT_RESTARTED
            self._store.save_sandbox(rec)  # also the token, if the /init gave it a new one
            self._store.record_event("agent_restarted", sandbox_id, processes="lost")

    # Steps of the manager's (and recovery's), declared here so the dependency is visible.

    def get(self, sandbox_id: str, *, team: str | None = None) -> SandboxRecord:
        raise NotImplementedError

    def list_running(self) -> list[SandboxRecord]:
        raise NotImplementedError

    def _lock(self, sandbox_id: str) -> anyio.Lock:
        raise NotImplementedError

    async def _vm_lost(self, rec: SandboxRecord, *, revertible: bool, when: str) -> None:
        raise NotImplementedError
