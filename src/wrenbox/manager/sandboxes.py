"""The face of wrenbox's control plane: everything a caller may do with sandboxes and templates.

:class:`Sandboxes` is what the API server, the CLI, the demo and the benchmarks program against, and
nothing else: :class:`~wrenbox.manager.manager.SandboxManager` implements it on one host, and a cluster
front will implement it over many. What it hands out are records (:mod:`wrenbox.records`), the guest
agent's client for one request (:meth:`Sandboxes.use`) and addresses to stream to (:meth:`Sandboxes.route`);
never a store, a runtime or a VM.

Tenancy: every call that names a sandbox or a template takes the caller's ``team``. A team sees and
acts on its own sandboxes only, and uses its own templates and the operator's (public) ones; anything
else is ``NotFound``, exactly as if it did not exist. Only the operator deletes public templates. What a
team makes belongs to it (sandboxes, and templates made from them), and counts against its quota.
``team`` None is the host's operator (the CLI on the host, in-process callers): it sees everything.

Every method raises :mod:`wrenbox.errors` only: ``NotFound`` for an unknown (or destroyed, or another
team's) sandbox or template, ``InvalidArgument`` for bad input (nothing was changed),
``NotRunning``/``Conflict`` for a sandbox in the wrong state, ``PermissionDenied`` for a team deleting a
public template, ``Unavailable`` when a limit is reached (retry later), and its ``QuotaExceeded`` when a
team holds all its quota allows (free something first).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from wrenbox.cidrs import parse_cidrs
from wrenbox.errors import InvalidArgument
from wrenbox.records import SandboxRecord, SandboxState, TemplateRecord

if TYPE_CHECKING:
    from wrenbox.envd import AsyncEnvdClient, ExecResult, Metrics
    from wrenbox.manager.store import Event

__all__ = ["Address", "CreateRequest", "Egress", "SandboxMetrics", "Sandboxes"]

_MAX_MAP_ITEMS = 64
_MAX_EGRESS = 1024
_MAX_MAP_LEN = 1024


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """A new sandbox. ``None`` fields take the manager's defaults.

    ``timeout_s``: seconds it runs before it is paused (or killed, per ``on_timeout``), counted from
    its creation and again from each resume, movable with ``set_timeout`` (E2B's lifetimes: using a
    sandbox does not extend them); 0 never. ``pause_memory``: that pause keeps memory (else disk
    only). ``auto_resume``: traffic through :meth:`Sandboxes.route` resumes it while it is paused.
    ``egress``: its outbound rules (see :class:`Egress`; default: the host's).
    ``cold_boot``: boot the template's image instead of restoring its snapshot. ``sandbox_id``: choose
    the id (validated) instead of getting a fresh one; for the operator's tools (tests, crash drills),
    never offered through the API, where ids are the server's. ``team``: the tenant that owns it (the
    API's; it must be allowed the template, and templates made from the sandbox belong to it too).
    """

    template: str | None = None
    timeout_s: int | None = None
    on_timeout: Literal["pause", "kill"] = "pause"
    metadata: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    cold_boot: bool = False
    sandbox_id: str | None = None
    team: str | None = None
    pause_memory: bool = True
    auto_resume: bool = False
    egress: Egress | None = None


@dataclass(frozen=True, slots=True)
class Egress:
    """Where a sandbox may open connections: IPv4 addresses or CIDRs. ``allow`` wins over ``deny``; the
    host's default-deny ranges (private and metadata space) apply after both, unless allowed."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The parser the firewall loads them with: what is accepted here is what a slot can enforce.
        parse_cidrs(self.allow, "egress allow list", limit=_MAX_EGRESS)
        parse_cidrs(self.deny, "egress deny list", limit=_MAX_EGRESS)

    def to_record(self) -> dict[str, list[str]]:
        return {"allow": list(self.allow), "deny": list(self.deny)}


class Address(NamedTuple):
    """Where to send a sandbox's traffic for one guest port (reachable from this host).

    ``since`` is when the sandbox's current run began (created or resumed): connections opened in an
    earlier run lead to a VM that is gone (paused, rebooted, or another sandbox on a reused address),
    so a proxy must not reuse them.
    """

    host: str
    port: int
    since: float = 0.0


@dataclass(frozen=True, slots=True)
class SandboxMetrics:
    """What a sandbox costs the host now (``host``: bytes and CPU seconds; see the runtime) and, while
    it runs, the guest's own view."""

    state: SandboxState
    host: dict[str, int | float]
    guest: Metrics | None = None


class Sandboxes(Protocol):
    """Everything a caller may do. Async; call from one event loop."""

    # -- sandboxes -----------------------------------------------------------------------------------

    async def create(self, request: CreateRequest) -> SandboxRecord:
        """A running sandbox from a template (restored from its snapshot unless ``cold_boot``)."""
        ...

    def get(self, sandbox_id: str, *, team: str | None = None) -> SandboxRecord: ...

    def list(
        self,
        *,
        states: set[SandboxState] | None = None,
        metadata: dict[str, str] | None = None,
        template: str | None = None,
        team: str | None = None,
    ) -> list[SandboxRecord]:
        """Sandboxes in creation order matching every filter given; destroyed ones only when asked
        for by state."""
        ...

    async def destroy(self, sandbox_id: str, *, team: str | None = None) -> None:
        """Release everything the sandbox holds, running or paused. Destroying twice does nothing."""
        ...

    async def pause(self, sandbox_id: str, *, memory: bool = True, team: str | None = None) -> SandboxRecord:
        """Write a running sandbox to disk and stop it: with its memory (it resumes where it was), or its
        disk only (it boots again on resume, files kept, processes gone). Counts against the team's
        quota of paused sandboxes and bytes."""
        ...

    async def resume(
        self, sandbox_id: str, timeout_s: int | None = None, *, memory: bool = True, team: str | None = None
    ) -> SandboxRecord:
        """Bring a paused sandbox back, to time out ``timeout_s`` (default: its own timeout) from now;
        ``memory=False`` boots it from its disk even if its memory was kept. A running sandbox is
        returned as it is. Its agent gets a new access token if a template holds its old one (made
        from it since its last start): read ``access_token`` from the record returned."""
        ...

    async def connect(
        self, sandbox_id: str, timeout_s: int | None = None, *, team: str | None = None
    ) -> SandboxRecord:
        """The sandbox, running: resumed first if it is paused (E2B's ``connect``). ``timeout_s`` only
        ever gives a running sandbox more time, never less."""
        ...

    def set_timeout(
        self, sandbox_id: str, timeout_s: int | None, *, team: str | None = None
    ) -> SandboxRecord:
        """Time out ``timeout_s`` seconds from now (sooner or later than before; 0: now), or never
        (None)."""
        ...

    async def set_egress(self, sandbox_id: str, egress: Egress, *, team: str | None = None) -> SandboxRecord:
        """Replace the sandbox's outbound rules; a running sandbox's take effect at once (connections
        already open are not cut), a paused one's when it resumes."""
        ...

    def ping(self, sandbox_id: str, *, team: str | None = None) -> None:
        """Keep a running sandbox alive: it times out no sooner than its timeout from now."""
        ...

    async def snapshot(
        self, sandbox_id: str, name: str | None = None, *, team: str | None = None
    ) -> TemplateRecord:
        """A template from the sandbox, which stays as it was (a running one keeps running, as E2B's
        snapshots do); a name is made up when none is given. It belongs to the sandbox's team."""
        ...

    async def fork(self, sandbox_id: str, count: int = 1, *, team: str | None = None) -> list[SandboxRecord]:
        """``count`` new sandboxes from a running one, which keeps running; all or none."""
        ...

    # -- inside a running sandbox --------------------------------------------------------------------

    def use(
        self, sandbox_id: str, *, team: str | None = None
    ) -> AbstractAsyncContextManager[AsyncEnvdClient]:
        """The guest agent's client for one request. Counts as activity; if the sandbox starts pausing or
        stopping meanwhile, the block is cancelled and raises NotRunning."""
        ...

    def route(
        self, sandbox_id: str, port: int, *, team: str | None = None
    ) -> AbstractAsyncContextManager[Address]:
        """Where to stream traffic for guest ``port``, for as long as the block runs (a proxy's
        connection). Counts as activity; cancelled like :meth:`use`. A paused sandbox made with
        ``auto_resume`` is resumed first. (E2B's proxy names no team: the guest agent's token is what
        guards the sandbox's traffic.)"""
        ...

    async def exec(self, sandbox_id: str, cmd: Any, *, team: str | None = None, **kwargs: Any) -> ExecResult:
        """Run ``cmd`` to completion and collect its output (capped)."""
        ...

    def exec_stream(
        self, sandbox_id: str, cmd: Any, *, team: str | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """Run ``cmd`` and yield its events (started, stdout, stderr, exited) as they happen."""
        ...

    async def metrics(self, sandbox_id: str, *, team: str | None = None) -> SandboxMetrics:
        """What the sandbox uses now. Observing is not use: it does not count as activity."""
        ...

    def events(
        self, *, sandbox_id: str | None = None, after: int = 0, limit: int = 1000, team: str | None = None
    ) -> list[Event]:
        """The event log (every state change, template change, expiry, recovery), oldest first, after
        sequence number ``after``. A team reads only its own sandboxes' and must name one."""
        ...

    # -- templates -----------------------------------------------------------------------------------

    def templates(self, *, team: str | None = None) -> list[TemplateRecord]:
        """Every template the team may use, ready or being built."""
        ...

    def template(self, name: str, *, team: str | None = None) -> TemplateRecord: ...

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
        """Boot image ``image`` once and publish it as template ``name`` (immutable; AlreadyExists if the
        name is taken), owned by ``team`` (None: public). Its sandboxes get ``vcpus``, ``memory_mb`` and a
        root disk of ``disk_mb`` (sparse). ``on_step`` hears each build step as it starts."""
        ...

    async def delete_template(self, name: str, *, team: str | None = None) -> None:
        """Delete a template nothing uses (InUse otherwise) that the team owns."""
        ...


def check_str_map(what: str, value: object) -> dict[str, str]:
    """``value`` if it is a small mapping of non-empty string keys to strings, else InvalidArgument."""
    if not isinstance(value, dict) or len(value) > _MAX_MAP_ITEMS:
        raise InvalidArgument(f"{what} must be a mapping of at most {_MAX_MAP_ITEMS} string pairs")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise InvalidArgument(f"{what} keys and values must be strings (got {k!r}: {v!r})")
        if len(k) > _MAX_MAP_LEN or len(v) > _MAX_MAP_LEN or "\0" in k + v:
            raise InvalidArgument(f"{what} entry {k[:40]!r} is too long or contains NUL")
    return dict(value)


def check_timeout(timeout_s: object) -> int:
    if not isinstance(timeout_s, int) or isinstance(timeout_s, bool) or timeout_s < 0:
        raise InvalidArgument(f"timeout must be a non-negative number of seconds, not {timeout_s!r}")
    return timeout_s


def check_port(port: object) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidArgument(f"port must be an integer from 1 to 65535, not {port!r}")
    return port
