"""Per-team limits: running sandboxes and starts in flight. Over a limit, the API answers 429 with
``Retry-After`` at once (E2B's SDK waits and retries) rather than queueing the caller or failing later.

The manager's own limits (the whole host's) still apply underneath; these keep one team from taking
all of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from wrenbox.api.wire import SHOWN_AS
from wrenbox.errors import Unavailable
from wrenbox.manager import Sandboxes

__all__ = ["TeamLimits"]

_LIVE = set(SHOWN_AS["running"])  # what the team sees running


@dataclass
class TeamLimits:
    sandboxes: Sandboxes
    max_running: int = 20
    max_starting: int = 4

    def __post_init__(self) -> None:
        self._starting: dict[str, int] = {}

    @contextmanager
    def start(self, team: str, count: int = 1) -> Iterator[None]:
        """Hold ``count`` starts (create, resume, fork) for ``team`` while the block runs."""
        starting = self._starting.get(team, 0)
        if starting + count > self.max_starting:
            raise Unavailable(
                f"team {team} has {starting} sandboxes starting (at most {self.max_starting} at once)"
            )
        running = len(self.sandboxes.list(states=_LIVE, team=team))
        if running + count > self.max_running:
            raise Unavailable(
                f"team {team} has {running} running sandboxes (at most {self.max_running}); "
                "pause or kill some first"
            )
        self._starting[team] = starting + count
        try:
            yield
        finally:
            self._starting[team] -= count
