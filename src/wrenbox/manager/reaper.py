"""The reaper: pauses (or kills) running sandboxes past their end (``end_at``), within a second.

A sandbox's end is its timeout counted from its start, moved only by ``set_timeout``, ``connect`` and
``ping`` (E2B's lifetimes); the manager keeps it and the reaper only reads it. A sandbox whose auto-pause
fails is kept running and retried with exponential backoff; it is never destroyed because a pause failed.
Expired sandboxes are handled concurrently (bounded), so one slow pause does not hold up the others.
It also runs the host's periodic ``watches`` (the manager's ``check_host``: the firewall table, restarted
agents) every ``watch_interval_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio
from anyio.abc import TaskGroup

from wrenbox.records import SandboxRecord, SandboxState

__all__ = ["Reapable", "Reaper", "ReaperConfig"]

log = logging.getLogger(__name__)


class Reapable(Protocol):
    """What the reaper needs from the manager."""

    def list_running(self) -> list[SandboxRecord]: ...

    async def expire(self, sandbox_id: str, action: str) -> None:
        """Pause or kill ``sandbox_id`` because it reached its end; must re-check that it still has."""
        ...


@dataclass(frozen=True, slots=True)
class ReaperConfig:
    interval_s: float = 0.5
    concurrency: int = 2
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 300.0
    watch_interval_s: float = 2.0


class Reaper:
    """Run with ``await reaper.run()`` in a task group; cancel the group to stop it."""

    def __init__(
        self,
        target: Reapable,
        config: ReaperConfig | None = None,
        clock: Callable[[], float] = time.time,
        watches: Sequence[Callable[[], Awaitable[object]]] = (),
    ) -> None:
        self.target = target
        self.watches = tuple(watches)
        self.config = config or ReaperConfig()
        self.clock = clock
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._busy: set[str] = set()
        self._limit = anyio.Semaphore(self.config.concurrency)

    def due(self) -> list[SandboxRecord]:
        """Running sandboxes past their timeout and not waiting out a retry backoff."""
        now = self.clock()
        out = []
        for rec in self.target.list_running():
            if rec.state is not SandboxState.RUNNING or rec.end_at is None or rec.id in self._busy:
                continue
            if now < rec.end_at:
                self._forget(rec.id)  # given more time since the last failure: start afresh
                continue
            if self._retry_at.get(rec.id, 0.0) > now:
                continue
            out.append(rec)
        return out

    async def sweep(self) -> None:
        """One pass: expire everything that is due, at most ``concurrency`` at a time."""
        async with anyio.create_task_group() as tg:
            self._start_due(tg)

    async def run(self) -> None:
        """Look every ``interval_s``; expirations run in the background, so a slow pause never
        delays noticing the next sandbox's end."""
        async with anyio.create_task_group() as tg:
            for watch in self.watches:
                tg.start_soon(self._watch, watch)
            while True:
                self._start_due(tg)
                await anyio.sleep(self.config.interval_s)

    def _start_due(self, tg: TaskGroup) -> None:
        for rec in self.due():
            self._busy.add(rec.id)
            tg.start_soon(self._expire, rec)

    async def _expire(self, rec: SandboxRecord) -> None:
        try:
            async with self._limit:
                await self.target.expire(rec.id, rec.on_timeout)
        except Exception as exc:
            n = self._failures.get(rec.id, 0) + 1
            self._failures[rec.id] = n
            delay = min(self.config.backoff_initial_s * 2 ** (n - 1), self.config.backoff_max_s)
            self._retry_at[rec.id] = self.clock() + delay
            log.warning(
                "auto-%s of sandbox %s failed (attempt %d), retrying in %.0f s: %s",
                rec.on_timeout,
                rec.id,
                n,
                delay,
                exc,
            )
        else:
            self._forget(rec.id)
        finally:
            self._busy.discard(rec.id)

    async def _watch(self, watch: Callable[[], Awaitable[object]]) -> None:
        while True:
            try:
                await watch()
            except Exception:  # logged and tried again next time: a watch must not stop the reaper
                log.exception("periodic check %s failed", getattr(watch, "__qualname__", watch))
            await anyio.sleep(self.config.watch_interval_s)

    def _forget(self, sandbox_id: str) -> None:
        self._retry_at.pop(sandbox_id, None)
        self._failures.pop(sandbox_id, None)

    def failures(self, sandbox_id: str) -> int:
        return self._failures.get(sandbox_id, 0)
