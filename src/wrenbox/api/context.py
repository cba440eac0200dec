"""What every REST handler stands on: the server's parts, and the caller's team.

Handlers declare ``ctx: Ctx`` and ``team: Team`` and get the :class:`ApiContext` and the team of the
request's ``X-API-KEY``, and pass the team to every manager call: the manager decides what the team may
see and do (another team's sandbox is indistinguishable from one that does not exist) and enforces its
quotas. :meth:`ApiContext.sandbox` and :meth:`ApiContext.template` add only what E2B's callers are shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from wrenbox.api.keys import KeyStore
from wrenbox.api.sampler import MetricsSampler
from wrenbox.api.wire import Wire, public_state, template_name
from wrenbox.errors import NotFound
from wrenbox.manager import Sandboxes
from wrenbox.records import SandboxRecord, TemplateRecord, TemplateState

__all__ = ["ApiContext", "Ctx", "Team"]


@dataclass(frozen=True, slots=True)
class ApiContext:
    sandboxes: Sandboxes
    keys: KeyStore
    wire: Wire
    sampler: MetricsSampler

    def sandbox(self, team: str, sandbox_id: str) -> SandboxRecord:
        """The team's sandbox ``sandbox_id`` (E2B also accepts ``<id>-<clientID>``), if E2B's callers
        would see it: live or paused."""
        sandbox_id = sandbox_id.split("-", 1)[0]
        rec = self.sandboxes.get(sandbox_id, team=team)
        if public_state(rec.state) is None:
            raise NotFound(f"sandbox {sandbox_id} not found")
        return rec

    def template(self, team: str, ref: str, *, ready: bool = True) -> TemplateRecord:
        """The template ``ref`` names, if the team may use it (its own, or one the operator built)."""
        try:
            t = self.sandboxes.template(template_name(ref), team=team)
        except NotFound:
            raise NotFound(f"template {ref!r} not found") from None
        if ready and t.state is not TemplateState.READY:
            raise NotFound(f"template {ref!r} not found")
        return t


def _context(request: Request) -> ApiContext:
    return request.app.state.ctx


def _team(request: Request, ctx: Annotated[ApiContext, Depends(_context)]) -> str:
    return ctx.keys.authenticate(request.headers.get("x-api-key")).team


Ctx = Annotated[ApiContext, Depends(_context)]
Team = Annotated[str, Depends(_team)]
