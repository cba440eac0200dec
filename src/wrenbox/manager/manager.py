"""The sandbox manager: the lifecycle users see, persisted, serialised per sandbox, surviving restarts.

The manager owns *policy*: which moves are legal (:mod:`wrenbox.records`), one lock per sandbox so
lifecycle operations never interleave, admission limits, activity, persistence of every transition, and
what a failure leaves behind. The *mechanics* — VMs, disks, network slots, memory snapshots, the guest
agent — live behind the :class:`~wrenbox.runtime.base.Runtime` protocol (:mod:`wrenbox.runtime.host` on a
real host, a fake in unit tests), which records every resource it acquires in a
:class:`~wrenbox.ledger.Ledger`.

Failure rules, for every operation: the ledger unwinds what the operation acquired, newest first; the
sandbox goes back to the state it was in (a failed pause leaves it running, a failed resume leaves it
paused with its snapshot untouched), or to ``error`` when something could not be released — then the
leftovers are recorded on the sandbox for a later destroy or reclaim.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio

from wrenbox import faults
from wrenbox.errors import AlreadyExists, InUse, InvalidArgument, NotFound, NotRunning, Unavailable
from wrenbox.ledger import Ledger
from wrenbox.manager.recovery import RecoveryMixin
from wrenbox.manager.store import Store
from wrenbox.names import new_sandbox_id, validate_name, validate_sandbox_id
from wrenbox.records import (
    SandboxRecord,
    SandboxState,
    TemplateRecord,
    TemplateState,
    check_transition,
)
from wrenbox.runtime.base import Runtime

__all__ = ["CreateRequest", "ManagerConfig", "Runtime", "SandboxManager"]

log = logging.getLogger(__name__)
S = SandboxState

_MAX_MAP_ITEMS = 64
_MAX_MAP_LEN = 1024


@dataclass(frozen=True, slots=True)
class ManagerConfig:
    templates_dir: Path
    max_sandboxes: int = 32
    max_concurrent_starts: int = 4
    exec_output_cap_bytes: int = 16 * 1024 * 1024
    default_template: str = "minimal"
    default_timeout_s: int = 300
    on_shutdown: Literal["pause", "destroy"] = "pause"


@dataclass(frozen=True, slots=True)
class CreateRequest:
    template: str | None = None
    timeout_s: int | None = None
    on_timeout: Literal["pause", "kill"] = "pause"
    metadata: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    cold_boot: bool = False
    sandbox_id: str | None = None


def _check_str_map(what: str, value: object) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > _MAX_MAP_ITEMS:
        raise InvalidArgument(f"{what} must be a mapping of at most {_MAX_MAP_ITEMS} string pairs")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise InvalidArgument(f"{what} keys and values must be strings (got {k!r}: {v!r})")
        if len(k) > _MAX_MAP_LEN or len(v) > _MAX_MAP_LEN or "\0" in k + v:
            raise InvalidArgument(f"{what} entry {k[:40]!r} is too long or contains NUL")
    return dict(value)


def _check_timeout(timeout_s: object) -> int:
    if not isinstance(timeout_s, int) or isinstance(timeout_s, bool) or timeout_s < 0:
        raise InvalidArgument(f"timeout must be a non-negative number of seconds, not {timeout_s!r}")
    return timeout_s


class SandboxManager(RecoveryMixin):
    """The lifecycle of sandboxes. Async; call from one event loop."""

    def __init__(
        self,
        config: ManagerConfig,
        store: Store,
        runtime: Runtime,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.runtime = runtime
        self.clock = clock
        self._locks: dict[str, anyio.Lock] = {}
        self._admission = anyio.Lock()
        self._starts = anyio.Semaphore(config.max_concurrent_starts)
        self._users: dict[str, set[anyio.CancelScope]] = {}
        self._active: dict[str, float] = {}

    # -- queries -------------------------------------------------------------------------------------

    def get(self, sandbox_id: str) -> SandboxRecord:
        rec = self.store.get_sandbox(sandbox_id)
        rec.last_active_at = self._last_active(rec)
        return rec

    def list(
        self,
        *,
        states: set[SandboxState] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> list[SandboxRecord]:
        """Sandboxes matching the filters; destroyed ones only when asked for by state."""
        wanted = states if states is not None else set(SandboxState) - {S.DESTROYED}
        recs = self.store.list_sandboxes(states=wanted, metadata=metadata)
        for rec in recs:
            rec.last_active_at = self._last_active(rec)
        return recs

    def list_running(self) -> list[SandboxRecord]:
        return self.list(states={S.RUNNING})

    # -- activity ------------------------------------------------------------------------------------

    def touch(self, sandbox_id: str) -> None:
        """Note that the sandbox is in use now (kept in memory; get/list and the reaper see it)."""
        self._active[sandbox_id] = self.clock()

    def _last_active(self, rec: SandboxRecord) -> float:
        if self._users.get(rec.id):  # a request in flight (a long command, a stream) is use right now
            return self.clock()
        return max(rec.last_active_at, self._active.get(rec.id, 0.0))

    def ping(self, sandbox_id: str) -> None:
        self._running(sandbox_id)
        self.touch(sandbox_id)

    def set_timeout(self, sandbox_id: str, timeout_s: int) -> SandboxRecord:
        _check_timeout(timeout_s)
        rec = self.get(sandbox_id)
        if rec.state is S.DESTROYED:
            raise NotFound(f"sandbox {sandbox_id} was destroyed")
        rec.timeout_s = timeout_s
        rec.last_active_at = self.clock()
        self._active[sandbox_id] = rec.last_active_at
        self.store.save_sandbox(rec)
        return rec

    # -- lifecycle -----------------------------------------------------------------------------------

    async def create(self, req: CreateRequest) -> SandboxRecord:
        template = self._ready_template(req.template or self.config.default_template)
        timeout_s = self.config.default_timeout_s if req.timeout_s is None else req.timeout_s
        if req.on_timeout not in ("pause", "kill"):
            raise InvalidArgument(f"on_timeout must be 'pause' or 'kill', not {req.on_timeout!r}")
        now = self.clock()
        rec = SandboxRecord(
            id=new_sandbox_id() if req.sandbox_id is None else validate_sandbox_id(req.sandbox_id),
            template=template.name,
            vcpus=template.vcpus,
            memory_mb=template.memory_mb,
            timeout_s=_check_timeout(timeout_s),
            on_timeout=req.on_timeout,
            metadata=_check_str_map("metadata", req.metadata),
            env=_check_str_map("env", req.env),
            created_at=now,
            last_active_at=now,
            state_changed_at=now,
        )
        async with self._admitted(rec), self._lock(rec.id):
            try:
                async with self._ledger(rec, "create") as ledger:
                    host_ip = await self.runtime.start(rec, template, ledger, cold=req.cold_boot)
                    ledger.commit()
            except BaseException as exc:  # cancelled too: settle, then propagate
                self._failed(rec, exc, fallback=S.DESTROYED)
                raise
            self.touch(rec.id)
            return self._move(rec, S.RUNNING, host_ip=host_ip, last_active_at=self.clock())

    async def destroy(self, sandbox_id: str) -> None:
        """Release everything the sandbox holds. Destroying a destroyed sandbox does nothing."""
        async with self._lock(sandbox_id):
            rec = self.get(sandbox_id)
            if rec.state is S.DESTROYED:
                return
            await self._destroy_locked(rec)
        await self._collect_template(rec.template)

    async def pause(self, sandbox_id: str) -> SandboxRecord:
        async with self._lock(sandbox_id):
            return await self._pause_locked(self.get(sandbox_id))

    async def resume(self, sandbox_id: str, timeout_s: int | None = None) -> SandboxRecord:
        if timeout_s is not None:
            _check_timeout(timeout_s)
        rec = self.get(sandbox_id)
        async with self._admitted(rec), self._lock(sandbox_id):
            rec = self.get(sandbox_id)
            if rec.state is S.RUNNING:
                return rec
            self._move(rec, S.RESUMING)
            if timeout_s is not None:
                rec.timeout_s = timeout_s
            try:
                async with self._ledger(rec, "resume") as ledger:
                    host_ip = await self.runtime.resume(rec, ledger)
                    ledger.commit()
            except BaseException as exc:  # cancelled too: settle, then propagate
                self._failed(rec, exc, fallback=S.PAUSED)
                raise
            self.touch(sandbox_id)
            return self._move(rec, S.RUNNING, host_ip=host_ip, last_active_at=self.clock())

    async def connect(self, sandbox_id: str, timeout_s: int | None = None) -> SandboxRecord:
        """The sandbox, running: resumed first if it is paused (E2B's ``connect``)."""
        rec = self.get(sandbox_id)
        if rec.state is S.PAUSED:
            return await self.resume(sandbox_id, timeout_s)
        if rec.state is not S.RUNNING:
            raise NotRunning(f"sandbox {sandbox_id} is {rec.state.value}")
        if timeout_s is not None:
            return self.set_timeout(sandbox_id, timeout_s)
        self.touch(sandbox_id)
        return rec

    async def snapshot(self, sandbox_id: str, name: str) -> TemplateRecord:
        """Make template ``name`` from a sandbox; a running sandbox is paused first and stays paused."""
        validate_name(name, what="snapshot name")
        self._check_template_free(name)
        async with self._lock(sandbox_id):
            rec = self.get(sandbox_id)
            if rec.state is S.RUNNING:
                rec = await self._pause_locked(rec)
            return await self._snapshot_locked(rec, name, kind="snapshot", back_to=S.PAUSED)

    async def fork(self, sandbox_id: str, count: int = 1) -> list[SandboxRecord]:
        """Snapshot a running sandbox in place (it keeps running) and create ``count`` sandboxes from it."""
        if not isinstance(count, int) or not 1 <= count <= self.config.max_sandboxes:
            raise InvalidArgument(f"fork count must be between 1 and {self.config.max_sandboxes}")
        async with self._lock(sandbox_id):
            rec = self.get(sandbox_id)
            if rec.state is not S.RUNNING:
                raise NotRunning(f"sandbox {sandbox_id} is {rec.state.value}; only running sandboxes fork")
            name = f"fork-{sandbox_id}-{new_sandbox_id()[:8]}"
            template = await self._snapshot_locked(rec, name, kind="fork", back_to=S.RUNNING)
        base = self.get(sandbox_id)
        req = CreateRequest(
            template=template.name,
            timeout_s=base.timeout_s,
            on_timeout=base.on_timeout,  # type: ignore[arg-type]
            metadata=base.metadata,
            env=base.env,
        )
        children: list[SandboxRecord] = []
        try:
            for _ in range(count):
                children.append(await self.create(req))
        except BaseException:
            # All or nothing: a fork that cannot make every child makes none.
            with anyio.CancelScope(shield=True):
                for child in children:
                    await self.destroy(child.id)
                await self._collect_template(template.name)
            raise
        return children

    async def delete_template(self, name: str) -> None:
        validate_name(name, what="template name")
        template = self.store.get_template(name)
        users = self.store.template_users(name)
        if users:
            raise InUse(f"template {name} is in use by {', '.join(users[:5])}")
        template.state = TemplateState.DELETING
        self.store.save_template(template)
        await self.runtime.delete_template(template)
        self.store.delete_template(name)
        self.store.record_event("template_deleted", None, template=name)

    # -- guest operations ----------------------------------------------------------------------------

    @asynccontextmanager
    async def use(self, sandbox_id: str) -> AsyncIterator[Any]:
        """The guest agent client of a running sandbox, for one request.

        Counts as activity. If the sandbox starts pausing or stopping while the request runs, the
        request is cancelled and raises NotRunning, so nobody ever waits on a frozen VM.
        """
        scope = anyio.CancelScope()
        gone = f"sandbox {sandbox_id} was paused or stopped while the request ran"
        self._users.setdefault(sandbox_id, set()).add(scope)
        try:
            rec = self._running(sandbox_id)
            self.touch(sandbox_id)
            with scope:
                yield self.runtime.envd(rec)
        except Exception as exc:
            # Cleanup that talks to the agent after the cancellation (e.g. killing the command) fails
            # in its own way once the VM is going; the cause is still the pause or stop.
            if scope.cancel_called:
                raise NotRunning(gone) from exc
            raise
        finally:
            self._users.get(sandbox_id, set()).discard(scope)
            self.touch(sandbox_id)
        if scope.cancelled_caught:
            raise NotRunning(gone)

    async def exec(self, sandbox_id: str, cmd: str, **kwargs: Any) -> Any:
        """Run ``cmd`` and collect its output, capped at the configured size."""
        kwargs.setdefault("output_cap", self.config.exec_output_cap_bytes)
        async with self.use(sandbox_id) as envd:
            return await envd.processes.exec(cmd, **kwargs)

    def exec_stream(self, sandbox_id: str, cmd: str, **kwargs: Any) -> AsyncIterator[Any]:
        """Run ``cmd`` and yield its events (started, stdout, stderr, exited) as they happen."""

        async def events() -> AsyncIterator[Any]:
            async with self.use(sandbox_id) as envd, envd.processes.exec_stream(cmd, **kwargs) as proc:
                async for event in proc:
                    self.touch(sandbox_id)
                    yield event

        return events()

    async def metrics(self, sandbox_id: str) -> dict[str, Any]:
        """Host-side cost of the sandbox, plus the guest's own view when it is running."""
        rec = self.get(sandbox_id)
        out: dict[str, Any] = {"state": rec.state.value, "host": self.runtime.host_metrics(rec)}
        if rec.state is S.RUNNING:
            async with self.use(sandbox_id) as envd:
                out["guest"] = dataclasses.asdict(await envd.metrics())
        return out

    async def expire(self, sandbox_id: str, action: str) -> None:
        """Called by the reaper: pause (or kill) a sandbox that is still idle past its timeout."""
        async with self._lock(sandbox_id):
            rec = self.get(sandbox_id)
            idle = self.clock() - rec.last_active_at
            if rec.state is not S.RUNNING or rec.timeout_s <= 0 or idle < rec.timeout_s:
                return  # used, paused or destroyed since the reaper looked
            self.store.record_event("expired", sandbox_id, action=action, idle_s=round(idle, 1))
            if action == "kill":
                await self._destroy_locked(rec)
                return
            try:
                await self._pause_locked(rec)
            except Exception:
                rec = self.get(sandbox_id)
                rec.pause_failures += 1
                self.store.save_sandbox(rec)
                raise

    async def shutdown(self) -> None:
        """Pause (or destroy, per config) every running sandbox; errors are logged, not raised."""
        for rec in self.list_running():
            try:
                if self.config.on_shutdown == "pause":
                    await self.pause(rec.id)
                else:
                    await self.destroy(rec.id)
            except Exception as exc:
                log.error("shutdown: could not %s sandbox %s: %s", self.config.on_shutdown, rec.id, exc)

    # -- lifecycle internals (caller holds the sandbox lock) -----------------------------------------

    async def _pause_locked(self, rec: SandboxRecord) -> SandboxRecord:
        self._move(rec, S.PAUSING)
        self._cancel_users(rec.id)
        try:
            async with self._ledger(rec, "pause") as ledger:
                await self.runtime.pause(rec, ledger)
                ledger.commit()
        except BaseException as exc:  # cancelled too: settle, then propagate
            self._failed(rec, exc, fallback=S.RUNNING)
            raise
        return self._move(rec, S.PAUSED, host_ip=None, pause_failures=0)

    async def _destroy_locked(self, rec: SandboxRecord) -> None:
        self._move(rec, S.STOPPING)
        self._cancel_users(rec.id)
        with anyio.CancelScope(shield=True):  # half a destroy would leave it 'stopping' until a restart
            leftovers = await self._release_all(rec)
        if leftovers:
            self._move(rec, S.ERROR, leftovers=leftovers, error="destroy could not release everything")
            return
        self._move(rec, S.DESTROYED, host_ip=None, leftovers=[])
        self._forget(rec.id)

    async def _snapshot_locked(
        self, rec: SandboxRecord, name: str, *, kind: str, back_to: SandboxState
    ) -> TemplateRecord:
        self._check_template_free(name)
        template = TemplateRecord(
            name=name,
            kind=kind,
            path=str(self.config.templates_dir / name),
            vcpus=rec.vcpus,
            memory_mb=rec.memory_mb,
            source=rec.id,
            parent=rec.template,
        )
        self.store.insert_template(template)
        self._move(rec, S.SNAPSHOTTING)
        try:
            async with self._ledger(rec, "snapshot") as ledger:
                manifest = await self.runtime.snapshot(rec, Path(template.path), ledger)
                ledger.commit()
        except BaseException as exc:  # cancelled too: settle, then propagate
            self.store.delete_template(name)
            self._failed(rec, exc, fallback=back_to)
            raise
        template.manifest = manifest
        template.size_bytes = int(manifest.get("size_bytes", 0))
        template.parent = manifest.get("parent", template.parent)
        template.state = TemplateState.READY
        self.store.save_template(template)
        self._move(rec, back_to)
        self.store.record_event("template_created", rec.id, template=name, template_kind=kind)
        return template

    async def _release_all(self, rec: SandboxRecord) -> list[str]:
        """Release every recorded resource, newest first; return what could not be released."""
        return await self._release(rec, rec.resources)

    # -- internals -----------------------------------------------------------------------------------

    def _lock(self, sandbox_id: str) -> anyio.Lock:
        return self._locks.setdefault(sandbox_id, anyio.Lock())

    def _forget(self, sandbox_id: str) -> None:
        self._locks.pop(sandbox_id, None)
        self._active.pop(sandbox_id, None)
        self._users.pop(sandbox_id, None)

    def _ledger(self, rec: SandboxRecord, label: str) -> Ledger:
        return Ledger(self.store, rec, self.runtime.release, label)

    def _running(self, sandbox_id: str) -> SandboxRecord:
        rec = self.get(sandbox_id)
        if rec.state is not S.RUNNING:
            if rec.state is S.DESTROYED:
                raise NotFound(f"sandbox {sandbox_id} was destroyed")
            raise NotRunning(f"sandbox {sandbox_id} is {rec.state.value}, not running")
        return rec

    def _ready_template(self, name: str) -> TemplateRecord:
        validate_name(name, what="template name")
        template = self.store.get_template(name)
        if template.state is not TemplateState.READY:
            raise NotFound(f"template {name} is {template.state.value}, not ready")
        return template

    def _check_template_free(self, name: str) -> None:
        try:
            self.store.get_template(name)
        except NotFound:
            return
        raise AlreadyExists(f"a template named {name} already exists")

    @asynccontextmanager
    async def _admitted(self, rec: SandboxRecord) -> AsyncIterator[None]:
        """Enforce the sandbox limit and the concurrent-start limit, or raise Unavailable at once."""
        async with self._admission:
            live = {r.id for r in self.store.list_sandboxes(states={s for s in SandboxState if s.live})}
            if rec.id not in live and len(live) >= self.config.max_sandboxes:
                raise Unavailable(f"the sandbox limit ({self.config.max_sandboxes}) is reached")
            try:
                self._starts.acquire_nowait()
            except anyio.WouldBlock:
                raise Unavailable(
                    f"{self.config.max_concurrent_starts} sandboxes are starting already; retry shortly"
                ) from None
            if rec.state is S.CREATING:
                try:
                    self.store.insert_sandbox(rec)
                except BaseException:
                    self._starts.release()
                    raise
                self.store.record_event("creating", rec.id, template=rec.template)
        try:
            yield
        finally:
            self._starts.release()

    def _move(self, rec: SandboxRecord, target: SandboxState, **changes: Any) -> SandboxRecord:
        check_transition(rec.id, rec.state, target)
        previous = rec.state
        rec.state = target
        rec.state_changed_at = self.clock()
        if target in {S.RUNNING, S.PAUSED, S.DESTROYED}:
            rec.error = None
        for key, value in changes.items():
            setattr(rec, key, value)
        self.store.save_sandbox(rec)
        self.store.record_event(target.value, rec.id, previous=previous.value)
        faults.point(f"state.{target.value}")
        return rec

    def _failed(self, rec: SandboxRecord, exc: BaseException, *, fallback: SandboxState) -> None:
        leftovers = list(getattr(exc, "leftovers", []))
        target = S.ERROR if leftovers else fallback
        log.warning("sandbox %s: %s failed (%s); now %s", rec.id, rec.state.value, exc, target.value)
        self._move(rec, target, leftovers=leftovers, error=f"{type(exc).__name__}: {exc}")
        if target is S.DESTROYED:
            self._forget(rec.id)

    def _cancel_users(self, sandbox_id: str) -> None:
        for scope in list(self._users.get(sandbox_id, ())):
            scope.cancel()

    async def _collect_template(self, name: str) -> None:
        """Fork templates exist only for their children: delete one when its last user is gone."""
        try:
            template = self.store.get_template(name)
        except NotFound:
            return
        if template.kind == "fork" and not self.store.template_users(name):
            try:
                await self.delete_template(name)
            except Exception as exc:
                log.warning("could not delete unused fork template %s: %s", name, exc)
