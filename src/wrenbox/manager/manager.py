"""The sandbox manager: the lifecycle users see, persisted, serialised per sandbox, surviving restarts.

:class:`SandboxManager` implements :class:`~wrenbox.manager.sandboxes.Sandboxes` on one host. It owns
*policy*: which moves are legal (:mod:`wrenbox.records`), one lock per sandbox so lifecycle operations
never interleave, admission limits, activity, persistence of every transition and template row, and what
a failure leaves behind. The *mechanics* — VMs, disks, network slots, memory snapshots, template files,
the guest agent — live behind the :class:`~wrenbox.runtime.base.Runtime` protocol
(:class:`wrenbox.runtime.host.HostRuntime` on a real host, a fake in unit tests), which records every
resource it acquires in a :class:`~wrenbox.ledger.Ledger`.

Failure rules, for every operation: the ledger unwinds what the operation acquired, newest first; the
sandbox goes back to the state it was in (a failed pause leaves it running, a failed resume leaves it
paused with its snapshot untouched), or to ``error`` when something could not be released — then the
leftovers are recorded on the sandbox for a later destroy or reclaim.

Tenancy, for every call: a caller that names a ``team`` acts only on that team's sandboxes and on
templates it may use (its own and the operator's); anything else is NotFound, exactly as if it did not
exist. Starting, pausing and making templates count against the team's quota (:mod:`.quotas`).
``team`` None is the host's operator (the CLI on the host, in-process callers), who sees everything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

from wrenbox import faults
from wrenbox.errors import InvalidArgument, NotFound, NotRunning
from wrenbox.ledger import Ledger
from wrenbox.manager.activity import Activity
from wrenbox.manager.admission import Admission, default_guest_memory_mb
from wrenbox.manager.catalog import TemplateCatalog
from wrenbox.manager.liveness import LivenessMixin
from wrenbox.manager.quotas import Quotas, TeamQuota
from wrenbox.manager.recovery import RecoveryMixin
from wrenbox.manager.sandboxes import (
    Address,
    CreateRequest,
    Egress,
    SandboxMetrics,
    check_port,
    check_str_map,
    check_timeout,
)
from wrenbox.manager.store import Event, Store
from wrenbox.names import new_sandbox_id, validate_sandbox_id
from wrenbox.records import SandboxRecord, SandboxState, TemplateRecord, TemplateState, check_transition
from wrenbox.runtime.base import PERSISTENT, Runtime

if TYPE_CHECKING:
    from wrenbox.envd import AsyncEnvdClient, ExecResult

__all__ = ["ManagerConfig", "SandboxManager"]

log = logging.getLogger(__name__)
S = SandboxState
# The moves that begin an operation writing to the data filesystem (a create's row is inserted by
# admission, likewise inside Store.spending).
_SPENDING = frozenset({S.PAUSING, S.RESUMING, S.SNAPSHOTTING})


@dataclass(frozen=True, slots=True)
class ManagerConfig:
    max_sandboxes: int = 32
    max_concurrent_starts: int = 4
    exec_output_cap_bytes: int = 16 * 1024 * 1024
    default_template: str = "minimal"
    default_timeout_s: int = 300
    default_vcpus: int = 1  # of templates built without saying
    default_memory_mb: int = 512
    default_disk_mb: int = 10 * 1024  # of templates built without saying (sparse: costs what is used)
    on_shutdown: Literal["pause", "destroy"] = "pause"
    # What live sandboxes' guest memory may add up to; None: four fifths of the host's RAM.
    max_guest_memory_mb: int | None = None
    ram_dir: Path | None = None  # where the runtime makes RAM files (checked for room); None: not checked
    quota: TeamQuota = field(default_factory=TeamQuota)  # every team's, unless it has its own below
    team_quotas: Mapping[str, TeamQuota] = field(default_factory=dict)


class SandboxManager(RecoveryMixin, LivenessMixin):
    """The lifecycle of sandboxes (:class:`~wrenbox.manager.sandboxes.Sandboxes`). Async; call from one
    event loop. ``store`` and ``runtime`` are its own: nobody else touches them."""

    def __init__(
        self,
        config: ManagerConfig,
        store: Store,
        runtime: Runtime,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._store = store
        self._runtime = runtime
        self.clock = clock
        self._locks: dict[str, anyio.Lock] = {}
        admission = anyio.Lock()  # one for new sandboxes' rows and templates' in-use checks
        self._catalog = TemplateCatalog(store, runtime, admission=admission)
        self._quotas = Quotas(store, runtime, config.quota, config.team_quotas)
        memory_mb = config.max_guest_memory_mb
        self._admission = Admission(
            store,
            self._catalog,
            admission,
            self._quotas,
            max_sandboxes=config.max_sandboxes,
            max_concurrent_starts=config.max_concurrent_starts,
            max_guest_memory_mb=default_guest_memory_mb() if memory_mb is None else memory_mb,
            ram_dir=config.ram_dir,
        )
        self._activity = Activity(clock)
        self._running_since: dict[str, float] = {}  # when each sandbox's current VM run began

    # -- queries -------------------------------------------------------------------------------------

    def get(self, sandbox_id: str, *, team: str | None = None) -> SandboxRecord:
        rec = self._store.get_sandbox(sandbox_id)
        if team is not None and rec.team != team:
            raise NotFound(f"sandbox {sandbox_id} not found")  # the store's words: nothing tells it exists
        rec.last_active_at = self._activity.last_active(rec.id, rec.last_active_at)
        return rec

    def list(
        self,
        *,
        states: set[SandboxState] | None = None,
        metadata: dict[str, str] | None = None,
        template: str | None = None,
        team: str | None = None,
    ) -> list[SandboxRecord]:
        wanted = states if states is not None else set(SandboxState) - {S.DESTROYED}
        if metadata is not None:
            check_str_map("metadata filter", metadata)
        recs = self._store.list_sandboxes(states=wanted, metadata=metadata, template=template, team=team)
        for rec in recs:
            rec.last_active_at = self._activity.last_active(rec.id, rec.last_active_at)
        return recs

    def list_running(self) -> list[SandboxRecord]:
        return self.list(states={S.RUNNING})

    def events(
        self, *, sandbox_id: str | None = None, after: int = 0, limit: int = 1000, team: str | None = None
    ) -> list[Event]:
        if not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidArgument(f"limit must be from 1 to 10000, not {limit!r}")
        if team is not None:
            if sandbox_id is None:
                raise InvalidArgument("a team reads the events of one of its sandboxes: name it")
            self.get(sandbox_id, team=team)
        return self._store.events(sandbox_id=sandbox_id, after=after, limit=limit)

    # -- activity ------------------------------------------------------------------------------------

    def touch(self, sandbox_id: str) -> None:
        """Note that the sandbox is in use now (kept in memory; get and list report it)."""
        self._activity.touch(sandbox_id)

    def ping(self, sandbox_id: str, *, team: str | None = None) -> None:
        rec = self._running(sandbox_id, team)
        self.touch(sandbox_id)
        if rec.timeout_s > 0:
            self._extend(rec, rec.timeout_s)

    def set_timeout(
        self, sandbox_id: str, timeout_s: int | None, *, team: str | None = None
    ) -> SandboxRecord:
        rec = self.get(sandbox_id, team=team)
        if rec.state is S.DESTROYED:
            raise NotFound(f"sandbox {sandbox_id} was destroyed")
        if timeout_s is None:
            return self._set_end(rec, None)
        check_timeout(timeout_s)
        return self._set_end(rec, self.clock() + timeout_s)

    async def set_egress(self, sandbox_id: str, egress: Egress, *, team: str | None = None) -> SandboxRecord:
        self.get(sandbox_id, team=team)
        async with self._lock(sandbox_id):
            rec = self.get(sandbox_id)
            if rec.state is S.DESTROYED:
                raise NotFound(f"sandbox {sandbox_id} was destroyed")
            previous = rec.egress
            rec.egress = egress.to_record()
            self._store.save_sandbox(rec)
            if rec.state is S.RUNNING:
                try:
                    await self._runtime.set_egress(rec)
                except BaseException:
                    rec.egress = previous
                    self._store.save_sandbox(rec)
                    raise
            self._store.record_event("egress", sandbox_id, **rec.egress)
            return rec

    def _extend(self, rec: SandboxRecord, seconds: int) -> SandboxRecord:
        """At least ``seconds`` more from now: an end only ever moves later this way."""
        return self._set_end(rec, max(rec.end_at or 0.0, self.clock() + seconds))

    def _set_end(self, rec: SandboxRecord, end_at: float | None) -> SandboxRecord:
        rec.end_at = end_at
        self._store.save_sandbox(rec)
        return rec

    # -- lifecycle -----------------------------------------------------------------------------------

    async def create(self, request: CreateRequest) -> SandboxRecord:
        template = self._catalog.ready(request.template or self.config.default_template, request.team)
        timeout_s = self.config.default_timeout_s if request.timeout_s is None else request.timeout_s
        if request.on_timeout not in ("pause", "kill"):
            raise InvalidArgument(f"on_timeout must be 'pause' or 'kill', not {request.on_timeout!r}")
        now = self.clock()
        rec = SandboxRecord(
            id=new_sandbox_id() if request.sandbox_id is None else validate_sandbox_id(request.sandbox_id),
            template=template.name,
            vcpus=template.vcpus,
            memory_mb=template.memory_mb,
            disk_mb=template.disk_mb,
            timeout_s=check_timeout(timeout_s),
            on_timeout=request.on_timeout,
            metadata=check_str_map("metadata", request.metadata),
            env=check_str_map("env", request.env),
            team=request.team,
            pause_memory=bool(request.pause_memory),
            egress=request.egress.to_record() if request.egress is not None else {},
            auto_resume=bool(request.auto_resume),
            created_at=now,
            last_active_at=now,
            state_changed_at=now,
        )
        async with self._admission.admitted(rec), self._lock(rec.id):
            try:
                async with self._ledger(rec, "create") as ledger:
                    host_ip = await self._runtime.start(rec, template, ledger, cold=request.cold_boot)
                    ledger.commit()
            except BaseException as exc:  # cancelled too: settle, then propagate
                self._failed(rec, exc, fallback=S.DESTROYED)
                raise
            self.touch(rec.id)
            self._running_since[rec.id] = self.clock()
            return self._move(
                rec, S.RUNNING, host_ip=host_ip, last_active_at=self.clock(), end_at=self._deadline(rec)
            )

    async def destroy(self, sandbox_id: str, *, team: str | None = None) -> None:
        self.get(sandbox_id, team=team)
        async with self._lock(sandbox_id):
            rec = self.get(sandbox_id)
            if rec.state is S.DESTROYED:
                return
            await self._destroy_locked(rec)
        await self._collect_template(rec.template)

    async def pause(self, sandbox_id: str, *, memory: bool = True, team: str | None = None) -> SandboxRecord:
        self.get(sandbox_id, team=team)
        async with self._lock(sandbox_id):
            rec = self.get(sandbox_id)
            if rec.state is S.RUNNING:  # else the move below says why it cannot pause
                self._quotas.check_pause(rec.team)
            return await self._pause_locked(rec, memory=memory)

    async def resume(
        self, sandbox_id: str, timeout_s: int | None = None, *, memory: bool = True, team: str | None = None
    ) -> SandboxRecord:
        if timeout_s is not None:
            check_timeout(timeout_s)
        rec = self.get(sandbox_id, team=team)
        async with self._admission.admitted(rec), self._lock(sandbox_id):
            rec = self.get(sandbox_id)
            if rec.state is S.RUNNING:
                return rec
            self._move(rec, S.RESUMING)
            if timeout_s is not None:
                rec.timeout_s = timeout_s
            try:
                async with self._ledger(rec, "resume") as ledger:
                    host_ip = await self._runtime.resume(rec, ledger, memory=memory)
                    ledger.commit()
            except BaseException as exc:  # cancelled too: settle, then propagate
                self._failed(rec, exc, fallback=S.PAUSED)
                raise
            self.touch(sandbox_id)
            self._running_since[sandbox_id] = self.clock()
            return self._move(
                rec, S.RUNNING, host_ip=host_ip, last_active_at=self.clock(), end_at=self._deadline(rec)
            )

    async def connect(
        self, sandbox_id: str, timeout_s: int | None = None, *, team: str | None = None
    ) -> SandboxRecord:
        rec = self.get(sandbox_id, team=team)
        if rec.state is S.PAUSED:
            return await self.resume(sandbox_id, timeout_s)
        if rec.state is not S.RUNNING:
            raise NotRunning(f"sandbox {sandbox_id} is {rec.state.value}")
        self.touch(sandbox_id)
        if timeout_s is not None and rec.end_at is not None:
            return self._extend(rec, check_timeout(timeout_s))
        return rec

    async def snapshot(
        self, sandbox_id: str, name: str | None = None, *, team: str | None = None
    ) -> TemplateRecord:
        self.get(sandbox_id, team=team)  # NotFound before anything else
        name = f"snapshot-{sandbox_id}-{new_sandbox_id()[:8]}" if name is None else name
        self._catalog.check_free(name)  # at once, rather than after a build of that name
        async with self._catalog.lock(name), self._lock(sandbox_id):
            self._catalog.check_free(name)
            rec = self.get(sandbox_id)
            self._quotas.check_template(rec.team, "snapshot")
            back_to = S.RUNNING if rec.state is S.RUNNING else S.PAUSED  # E2B's: the source goes on
            return await self._snapshot_locked(rec, name, kind="snapshot", back_to=back_to)

    async def fork(self, sandbox_id: str, count: int = 1, *, team: str | None = None) -> list[SandboxRecord]:
        if not isinstance(count, int) or not 1 <= count <= self.config.max_sandboxes:
            raise InvalidArgument(f"fork count must be between 1 and {self.config.max_sandboxes}")
        self.get(sandbox_id, team=team)  # NotFound before anything else
        name = f"fork-{sandbox_id}-{new_sandbox_id()[:8]}"
        async with self._catalog.lock(name), self._lock(sandbox_id):
            rec = self.get(sandbox_id)
            if rec.state is not S.RUNNING:
                raise NotRunning(f"sandbox {sandbox_id} is {rec.state.value}; only running sandboxes fork")
            # All or none: refuse now rather than after the snapshot and some of the children.
            self._quotas.check_running(rec.team, count)
            self._quotas.check_template(rec.team, "fork")
            template = await self._snapshot_locked(rec, name, kind="fork", back_to=S.RUNNING)
        base = self.get(sandbox_id)
        request = CreateRequest(
            template=template.name,
            timeout_s=base.timeout_s,
            on_timeout=base.on_timeout,  # type: ignore[arg-type]
            metadata=base.metadata,
            env=base.env,
            team=base.team,
            pause_memory=base.pause_memory,
            auto_resume=base.auto_resume,
            egress=Egress(**{k: tuple(v) for k, v in base.egress.items()}) if base.egress else None,
        )
        children: list[SandboxRecord] = []
        try:
            for _ in range(count):
                children.append(await self.create(request))
                faults.point("fork.child")
        except BaseException:
            # All or nothing: a fork that cannot make every child makes none.
            with anyio.CancelScope(shield=True):
                for child in children:
                    await self.destroy(child.id)
                await self._collect_template(template.name)
            raise
        return children

    # -- guest operations ----------------------------------------------------------------------------

    @asynccontextmanager
    async def use(self, sandbox_id: str, *, team: str | None = None) -> AsyncIterator[AsyncEnvdClient]:
        async with self._activity.using(sandbox_id, lambda: self._running(sandbox_id, team)) as rec:
            yield self._runtime.envd(rec)

    @asynccontextmanager
    async def route(self, sandbox_id: str, port: int, *, team: str | None = None) -> AsyncIterator[Address]:
        check_port(port)
        rec = self.get(sandbox_id, team=team)
        if rec.auto_resume and rec.state in (S.PAUSING, S.PAUSED):
            await self.resume(sandbox_id)  # waits for a pause under way, then wakes it
        async with self._activity.using(sandbox_id, lambda: self._running(sandbox_id)) as rec:
            assert rec.host_ip is not None  # running: it has an address
            yield Address(rec.host_ip, port, self._running_since.get(sandbox_id, 0.0))

    async def exec(self, sandbox_id: str, cmd: Any, *, team: str | None = None, **kwargs: Any) -> ExecResult:
        kwargs.setdefault("output_cap", self.config.exec_output_cap_bytes)
        async with self.use(sandbox_id, team=team) as envd:
            return await envd.processes.exec(cmd, **kwargs)

    def exec_stream(
        self, sandbox_id: str, cmd: Any, *, team: str | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        self.get(sandbox_id, team=team)  # at the call, not at the first event

        async def events() -> AsyncIterator[Any]:
            async with self.use(sandbox_id) as envd, envd.processes.exec_stream(cmd, **kwargs) as proc:
                async for event in proc:
                    self.touch(sandbox_id)
                    yield event

        return events()

    async def metrics(self, sandbox_id: str, *, team: str | None = None) -> SandboxMetrics:
        rec = self.get(sandbox_id, team=team)
        if rec.state is S.DESTROYED:
            raise NotFound(f"sandbox {sandbox_id} was destroyed")
        host = self._runtime.usage(rec)
        if rec.state is not S.RUNNING:
            return SandboxMetrics(rec.state, host)
        # Observing is not using: a metrics sampler must not keep every sandbox from timing out.
        return SandboxMetrics(rec.state, host, await self._runtime.envd(rec).metrics())

    # -- templates -----------------------------------------------------------------------------------

    def templates(self, *, team: str | None = None) -> list[TemplateRecord]:
        return self._catalog.list(team)

    def template(self, name: str, *, team: str | None = None) -> TemplateRecord:
        return self._catalog.get(name, team)

    async def build_template(
        self,
        name: str,
        *,
        image: str = "minimal",
        vcpus: int | None = None,
        memory_mb: int | None = None,
        disk_mb: int | None = None,
        on_step: Callable[[str], None] | None = None,
        team: str | None = None,
    ) -> TemplateRecord:
        self._quotas.check_template(team, "base")
        return await self._catalog.build(
            name,
            image=image,
            vcpus=self.config.default_vcpus if vcpus is None else vcpus,
            memory_mb=self.config.default_memory_mb if memory_mb is None else memory_mb,
            disk_mb=self.config.default_disk_mb if disk_mb is None else disk_mb,
            on_step=on_step,
            team=team,
        )

    async def delete_template(self, name: str, *, team: str | None = None) -> None:
        await self._catalog.delete(name, team)

    # -- called by the reaper and the service --------------------------------------------------------

    async def expire(self, sandbox_id: str, action: str) -> None:
        """Called by the reaper: pause (or kill) a sandbox that is still past its end."""
        async with self._lock(sandbox_id):
            rec = self.get(sandbox_id)
            now = self.clock()
            if rec.state is not S.RUNNING or rec.end_at is None or now < rec.end_at:
                return  # given more time, paused or destroyed since the reaper looked
            late = round(now - rec.end_at, 1)
            self._store.record_event("expired", sandbox_id, action=action, late_s=late)
            if action == "kill":
                await self._destroy_locked(rec)
                return
            try:
                # Over its quota the sandbox is kept running, and the reaper tries again later: a
                # sandbox is never destroyed because it could not pause.
                self._quotas.check_pause(rec.team)
                await self._pause_locked(rec, memory=rec.pause_memory)
            except Exception:
                rec = self.get(sandbox_id)
                if rec.state is not S.RUNNING:
                    return  # its VM was lost (settled by the pause): there is no pause to retry
                rec.pause_failures += 1
                self._store.save_sandbox(rec)
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

    async def _pause_locked(self, rec: SandboxRecord, *, memory: bool = True) -> SandboxRecord:
        self._move(rec, S.PAUSING)
        self._activity.cut(rec.id)
        try:
            async with self._ledger(rec, "pause") as ledger:
                await self._runtime.pause(rec, ledger, memory=memory)
                ledger.commit()
        except BaseException as exc:  # cancelled too: settle, then propagate
            with anyio.CancelScope(shield=True):
                lost = await self._settle_if_lost(rec)  # it failed because the VM is gone
            if not lost:
                self._failed(rec, exc, fallback=S.RUNNING)
            raise
        return self._move(rec, S.PAUSED, host_ip=None, pause_failures=0)

    async def _destroy_locked(self, rec: SandboxRecord) -> None:
        self._move(rec, S.STOPPING)
        self._activity.cut(rec.id)
        with anyio.CancelScope(shield=True):  # half a destroy would leave it 'stopping' until a restart
            leftovers = await self._release(rec, rec.resources)
        if leftovers:
            self._move(rec, S.ERROR, leftovers=leftovers, error="destroy could not release everything")
            return
        self._move(rec, S.DESTROYED, host_ip=None, leftovers=[])
        self._forget(rec.id)

    async def _snapshot_locked(
        self, rec: SandboxRecord, name: str, *, kind: str, back_to: SandboxState
    ) -> TemplateRecord:
        """Template ``name`` from ``rec`` (caller holds both locks); ``rec`` ends in ``back_to``."""
        with self._store.spending(f"a {kind} of {rec.id}"):
            row = self._catalog.begin(
                name,
                kind=kind,
                vcpus=rec.vcpus,
                memory_mb=rec.memory_mb,
                source=rec.id,
                parent=rec.template,
                team=rec.team,
            )
        try:
            self._move(rec, S.SNAPSHOTTING)
        except BaseException:  # refused (a full disk): no building row stays behind
            self._catalog.abandon(name)
            raise
        try:
            async with self._ledger(rec, "snapshot") as ledger:
                built = await self._runtime.snapshot(rec, name, ledger)
                ledger.commit()
        except BaseException as exc:  # cancelled too: settle, then propagate
            self._catalog.abandon(name)
            self._failed(rec, exc, fallback=back_to)
            raise
        template = self._catalog.finish(row, built, event="template_created")
        self._move(rec, back_to)
        return template

    async def _release(self, rec: SandboxRecord, resources: dict[str, Any]) -> list[str]:
        """Release ``resources`` (of ``rec``), newest first; return what could not be released."""
        leftovers = []
        for key in reversed(list(resources)):
            try:
                await self._runtime.release(rec, key, rec.resources[key])
            except Exception as exc:
                log.error("sandbox %s: could not release %s: %s", rec.id, key, exc)
                leftovers.append(key)
                continue
            faults.point(f"release.{key}")  # given back, still on record: a restart releases it again
            del rec.resources[key]
            self._store.save_sandbox(rec)
        return leftovers

    def _transient(self, rec: SandboxRecord) -> dict[str, Any]:
        """What only a live VM holds (a paused sandbox keeps the rest)."""
        return {k: v for k, v in rec.resources.items() if k not in PERSISTENT}

    # -- internals -----------------------------------------------------------------------------------

    def _deadline(self, rec: SandboxRecord) -> float | None:
        """When a sandbox starting to run now times out: its timeout from now."""
        return None if rec.timeout_s <= 0 else self.clock() + rec.timeout_s

    def _lock(self, sandbox_id: str) -> anyio.Lock:
        return self._locks.setdefault(sandbox_id, anyio.Lock())

    def _forget(self, sandbox_id: str) -> None:
        self._locks.pop(sandbox_id, None)
        self._running_since.pop(sandbox_id, None)
        self._activity.forget(sandbox_id)

    def _ledger(self, rec: SandboxRecord, label: str) -> Ledger:
        return Ledger(self._store, rec, self._runtime.release, label)

    def _running(self, sandbox_id: str, team: str | None = None) -> SandboxRecord:
        rec = self.get(sandbox_id, team=team)
        if rec.state is not S.RUNNING:
            if rec.state is S.DESTROYED:
                raise NotFound(f"sandbox {sandbox_id} was destroyed")
            raise NotRunning(f"sandbox {sandbox_id} is {rec.state.value}, not running")
        return rec

    def _move(self, rec: SandboxRecord, target: SandboxState, **changes: Any) -> SandboxRecord:
        check_transition(rec.id, rec.state, target)
        previous = rec.state
        rec.state = target
        rec.state_changed_at = self.clock()
        if target in {S.RUNNING, S.PAUSED, S.DESTROYED}:
            rec.error = None
        for key, value in changes.items():
            setattr(rec, key, value)
        # A move that begins spending space on the data filesystem needs the store's reserve whole; every
        # other one (those that settle a sandbox and a destroy's above all) may draw on it.
        spending = self._store.spending(f"{target.value} {rec.id}") if target in _SPENDING else nullcontext()
        with spending:
            self._store.save_sandbox(rec, event=(target.value, rec.id, {"previous": previous.value}))
        faults.point(f"state.{target.value}")
        return rec

    def _failed(self, rec: SandboxRecord, exc: BaseException, *, fallback: SandboxState) -> None:
        leftovers = list(getattr(exc, "leftovers", []))
        target = S.ERROR if leftovers else fallback
        log.warning("sandbox %s: %s failed (%s); now %s", rec.id, rec.state.value, exc, target.value)
        self._move(rec, target, leftovers=leftovers, error=f"{type(exc).__name__}: {exc}")
        if target is S.DESTROYED:
            self._forget(rec.id)

    async def _collect_template(self, name: str) -> None:
        """Fork templates exist only for their children: delete one when its last user is gone."""
        try:
            template = self._catalog.get(name)
        except NotFound:
            return
        ready = template.state is TemplateState.READY
        if template.kind == "fork" and ready and not self._store.template_users(name):
            try:
                await self.delete_template(name)
            except Exception as exc:
                log.warning("could not delete unused fork template %s: %s", name, exc)
