"""Team quotas: what one tenant may hold at once, checked by the manager before it adds to it.

A team (the API key's) has a :class:`TeamQuota`: live sandboxes and starts in flight (they come back when
sandboxes end: :class:`~wrenbox.errors.Unavailable`, retry later), paused sandboxes, templates, and bytes
on disk of its paused sandboxes and templates (they do not come back by waiting:
:class:`~wrenbox.errors.QuotaExceeded`). The operator (``team`` None) has no quota; the host's own limits
(:mod:`.admission`) apply to everyone.

Bytes are what the files occupy now, so a pause or a snapshot is refused once a team has reached its
bytes, and the one that crosses the line is let through: its size is known only when it is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from wrenbox.errors import QuotaExceeded, Unavailable
from wrenbox.manager.store import Store
from wrenbox.records import SandboxState, TemplateRecord, TemplateState
from wrenbox.runtime.base import Runtime

__all__ = ["PAUSED", "Quotas", "TeamQuota"]

LIVE = frozenset(s for s in SandboxState if s.live)
PAUSED = frozenset({SandboxState.PAUSING, SandboxState.PAUSED})
# Fork templates live only as long as the fork's children (the manager deletes them after): they count
# as bytes, not against the number of templates a team keeps.
_KEPT_KINDS = frozenset({"base", "snapshot"})


@dataclass(frozen=True, slots=True)
class TeamQuota:
    max_running: int = 20  # live sandboxes: running, starting, resuming, being snapshotted
    max_starting: int = 4  # creates, resumes and fork children in flight at once
    max_paused: int = 100
    max_templates: int = 50  # snapshots and builds (not forks' transient templates)
    max_disk_bytes: int = 100 << 30  # paused sandboxes' snapshots and disks, and templates' files


@dataclass
class Quotas:
    """The quotas of every team, and what each team holds now (from the store, and from the runtime for
    paused sandboxes' bytes)."""

    store: Store
    runtime: Runtime
    default: TeamQuota = field(default_factory=TeamQuota)
    teams: Mapping[str, TeamQuota] = field(default_factory=dict)

    def of(self, team: str) -> TeamQuota:
        return self.teams.get(team, self.default)

    def check_running(self, team: str | None, adding: int = 1, *, besides: str | None = None) -> None:
        """Room for ``adding`` more live sandboxes (``besides``: one that counts already, resuming)."""
        if team is None:
            return
        live = [r.id for r in self.store.list_sandboxes(states=set(LIVE), team=team) if r.id != besides]
        limit = self.of(team).max_running
        if len(live) + adding > limit:
            raise Unavailable(
                f"team {team} has {len(live)} running sandboxes (at most {limit}); pause or kill some first"
            )

    def check_pause(self, team: str | None) -> None:
        """Room for one more paused sandbox, on disk."""
        if team is None:
            return
        paused = len(self.store.list_sandboxes(states=set(PAUSED), team=team))
        limit = self.of(team).max_paused
        if paused + 1 > limit:
            raise QuotaExceeded(
                f"team {team} has {paused} paused sandboxes (at most {limit}); kill some first"
            )
        self._check_disk(team)

    def check_template(self, team: str | None, kind: str) -> None:
        """Room for one more template of ``kind`` ("snapshot", "fork", "base"), on disk."""
        if team is None:
            return
        if kind in _KEPT_KINDS:
            kept = [t for t in self._templates(team) if t.kind in _KEPT_KINDS]
            limit = self.of(team).max_templates
            if len(kept) + 1 > limit:
                raise QuotaExceeded(
                    f"team {team} has {len(kept)} templates and snapshots (at most {limit}); "
                    "delete some first"
                )
        self._check_disk(team)

    def disk_bytes(self, team: str) -> int:
        """Bytes the team's paused sandboxes and templates occupy on disk."""
        templates = sum(t.size_bytes for t in self._templates(team))
        paused = self.store.list_sandboxes(states={SandboxState.PAUSED}, team=team)
        return templates + sum(_stored_bytes(self.runtime.usage(rec)) for rec in paused)

    def _check_disk(self, team: str) -> None:
        used, limit = self.disk_bytes(team), self.of(team).max_disk_bytes
        if used >= limit:
            raise QuotaExceeded(
                f"team {team} holds {_size(used)} of paused sandboxes and templates (at most "
                f"{_size(limit)}); kill paused sandboxes or delete templates first"
            )

    def _templates(self, team: str) -> list[TemplateRecord]:
        rows = self.store.list_templates(states={TemplateState.BUILDING, TemplateState.READY})
        return [t for t in rows if t.team == team]


def _stored_bytes(usage: Mapping[str, int | float]) -> int:
    """A paused sandbox's bytes on disk: its root disk's own blocks and its snapshot."""
    return int(usage.get("disk_bytes", 0)) + int(usage.get("snapshot_bytes", 0))


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"
