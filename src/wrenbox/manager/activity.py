"""Activity: when each sandbox was last used, and which requests are using it right now.

Any use through wrenbox counts (a command, a file, a stream, proxied traffic, a ping), and a request in
flight counts as use for as long as it runs. Kept in memory: the manager persists ``last_active_at``
when it matters (transitions, timeouts), the reaper reads it through the manager.

A request holds the sandbox with :meth:`Activity.using`; when the sandbox starts pausing or stopping, or
its VM is lost, :meth:`Activity.cut` cancels every such request, which then raises NotRunning (saying
why) instead of talking to a frozen or dead VM.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio

from wrenbox.errors import NotRunning

__all__ = ["Activity"]

T = TypeVar("T")


class Activity:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._last: dict[str, float] = {}
        self._requests: dict[str, set[anyio.CancelScope]] = {}
        self._why_cut: dict[str, str] = {}

    def touch(self, sandbox_id: str, at: float | None = None) -> None:
        """Note that the sandbox is in use now (or was at ``at``)."""
        self._last[sandbox_id] = self.clock() if at is None else at

    def last_active(self, sandbox_id: str, recorded: float) -> float:
        """When the sandbox was last used: now while a request is in flight, else the later of what was
        ``recorded`` and what this process saw."""
        if self._requests.get(sandbox_id):
            return self.clock()
        return max(recorded, self._last.get(sandbox_id, 0.0))

    @asynccontextmanager
    async def using(self, sandbox_id: str, admit: Callable[[], T]) -> AsyncIterator[T]:
        """One request on the sandbox: ``admit()`` (which raises if the sandbox cannot serve it) gives what
        the block gets. Counts as use from start to end; cut by :meth:`cut`, it raises NotRunning."""
        scope = anyio.CancelScope()
        self._requests.setdefault(sandbox_id, set()).add(scope)
        try:
            admitted = admit()
            self.touch(sandbox_id)
            with scope:
                yield admitted
        except Exception as exc:
            # Cleanup that talks to the agent after the cancellation (e.g. killing the command) fails
            # in its own way once the VM is going; the cause is still the pause or stop.
            if scope.cancel_called:
                raise NotRunning(self._gone(sandbox_id)) from exc
            raise
        finally:
            self._requests.get(sandbox_id, set()).discard(scope)
            self.touch(sandbox_id)
        if scope.cancelled_caught:
            raise NotRunning(self._gone(sandbox_id))

    def cut(self, sandbox_id: str, why: str = "was paused or stopped") -> None:
        """Cancel every request in flight on the sandbox (it is pausing or stopping, or ``why``)."""
        self._why_cut[sandbox_id] = why
        for scope in list(self._requests.get(sandbox_id, ())):
            scope.cancel()

    def _gone(self, sandbox_id: str) -> str:
        why = self._why_cut.get(sandbox_id, "was paused or stopped")
        return f"sandbox {sandbox_id} {why} while the request ran"

    def forget(self, sandbox_id: str) -> None:
        self._last.pop(sandbox_id, None)
        self._requests.pop(sandbox_id, None)
        self._why_cut.pop(sandbox_id, None)
