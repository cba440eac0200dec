"""Admission: whether another sandbox may start now, answered at once — a refusal is Unavailable (or
QuotaExceeded), never a wait in a queue the caller cannot see.

The host's limits: how many sandboxes are live, how many start at once, the guest memory they add up to,
and free space for the new one's RAM file on the RAM filesystem. The team's: its quota of live sandboxes
and of starts (:mod:`.quotas`).

A new sandbox's row is inserted while admitted, under the same lock as a template deletion's in-use
check (:class:`~wrenbox.manager.catalog.TemplateCatalog`), so no create slips in between the two.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from wrenbox.errors import Unavailable
from wrenbox.manager.catalog import TemplateCatalog
from wrenbox.manager.quotas import LIVE, Quotas
from wrenbox.manager.store import Store
from wrenbox.records import SandboxRecord, SandboxState

__all__ = ["Admission", "default_guest_memory_mb"]


def default_guest_memory_mb() -> int:
    """Four fifths of the host's RAM: the rest is for the host, its VMMs and its page cache."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 4 // 5 >> 20


class Admission:
    """``max_guest_memory_mb``: the guest memory live sandboxes may add up to. ``ram_dir``: where their
    RAM files are made (a tmpfs), checked for room; None: not checked (a runtime without RAM files)."""

    def __init__(
        self,
        store: Store,
        catalog: TemplateCatalog,
        lock: anyio.Lock,
        quotas: Quotas,
        *,
        max_sandboxes: int,
        max_concurrent_starts: int,
        max_guest_memory_mb: int,
        ram_dir: Path | None = None,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._lock = lock
        self._quotas = quotas
        self.max_sandboxes = max_sandboxes
        self.max_concurrent_starts = max_concurrent_starts
        self.max_guest_memory_mb = max_guest_memory_mb
        self.ram_dir = ram_dir
        self._starts = anyio.Semaphore(max_concurrent_starts)
        self._team_starts: Counter[str] = Counter()

    @asynccontextmanager
    async def admitted(self, rec: SandboxRecord) -> AsyncIterator[None]:
        """Hold a start for ``rec`` (a new sandbox, whose row is inserted, or one resuming) for the
        block; Unavailable at once when a limit is reached."""
        async with self._lock:
            live = [r for r in self._store.list_sandboxes(states=set(LIVE)) if r.id != rec.id]
            if len(live) >= self.max_sandboxes:
                raise Unavailable(f"the sandbox limit ({self.max_sandboxes}) is reached")
            self._check_memory(rec, live)
            self._quotas.check_running(rec.team, besides=rec.id)
            team = rec.team
            if team is not None and self._team_starts[team] >= self._quotas.of(team).max_starting:
                raise Unavailable(
                    f"team {team} has {self._team_starts[team]} sandboxes starting (at most "
                    f"{self._quotas.of(team).max_starting} at once); retry shortly"
                )
            try:
                self._starts.acquire_nowait()
            except anyio.WouldBlock:
                raise Unavailable(
                    f"{self.max_concurrent_starts} sandboxes are starting already; retry shortly"
                ) from None
            if rec.state is SandboxState.CREATING:
                try:
                    self._catalog.ready(rec.template)  # it may have been deleted since it was looked up
                    with self._store.spending(f"creating {rec.id}"):
                        event = ("creating", rec.id, {"template": rec.template})
                        self._store.insert_sandbox(rec, event=event)
                except BaseException:
                    self._starts.release()
                    raise
            if team is not None:
                self._team_starts[team] += 1
        try:
            yield
        finally:
            self._starts.release()
            if team is not None:
                self._team_starts[team] -= 1

    def _check_memory(self, rec: SandboxRecord, live: list[SandboxRecord]) -> None:
        """Room for the guest memory of ``rec``: within the host's budget, and on the RAM filesystem,
        where its RAM file grows to its full size as the guest touches its memory."""
        used = sum(r.memory_mb for r in live)
        if used + rec.memory_mb > self.max_guest_memory_mb:
            raise Unavailable(
                f"the host has no room for {rec.memory_mb} MiB more guest memory ({used} of "
                f"{self.max_guest_memory_mb} MiB in use)"
            )
        if self.ram_dir is None:
            return
        free = _free_bytes(self.ram_dir)
        if free < rec.memory_mb << 20:
            raise Unavailable(
                f"the RAM filesystem at {self.ram_dir} has {free >> 20} MiB free; a sandbox of "
                f"{rec.memory_mb} MiB needs that much"
            )


def _free_bytes(path: Path) -> int:
    """Free bytes (for an unprivileged writer too) of the filesystem ``path`` is or will be on."""
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
