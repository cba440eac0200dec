"""Admission: whether another sandbox may start now (the sandbox limit and the concurrent-start limit),
answered at once — a refusal is Unavailable, never a wait in a queue the caller cannot see.

A new sandbox's row is inserted while admitted, under the same lock as a template deletion's in-use
check (:class:`~wrenbox.manager.catalog.TemplateCatalog`), so no create slips in between the two.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from wrenbox.errors import Unavailable
from wrenbox.manager.catalog import TemplateCatalog
from wrenbox.manager.store import Store
from wrenbox.records import SandboxRecord, SandboxState

__all__ = ["Admission"]

LIVE = frozenset(s for s in SandboxState if s.live)


class Admission:
    def __init__(
        self,
        store: Store,
        catalog: TemplateCatalog,
        lock: anyio.Lock,
        *,
        max_sandboxes: int,
        max_concurrent_starts: int,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._lock = lock
        self.max_sandboxes = max_sandboxes
        self.max_concurrent_starts = max_concurrent_starts
        self._starts = anyio.Semaphore(max_concurrent_starts)

    @asynccontextmanager
    async def admitted(self, rec: SandboxRecord) -> AsyncIterator[None]:
        """Hold a start for ``rec`` (a new sandbox, whose row is inserted, or one resuming) for the
        block; Unavailable at once when a limit is reached."""
        async with self._lock:
            live = {r.id for r in self._store.list_sandboxes(states=set(LIVE))}
            if rec.id not in live and len(live) >= self.max_sandboxes:
                raise Unavailable(f"the sandbox limit ({self.max_sandboxes}) is reached")
            try:
                self._starts.acquire_nowait()
            except anyio.WouldBlock:
                raise Unavailable(
                    f"{self.max_concurrent_starts} sandboxes are starting already; retry shortly"
                ) from None
            if rec.state is SandboxState.CREATING:
                try:
                    self._catalog.ready(rec.template)  # it may have been deleted since it was looked up
                    self._store.insert_sandbox(rec)
                except BaseException:
                    self._starts.release()
                    raise
                self._store.record_event("creating", rec.id, template=rec.template)
        try:
            yield
        finally:
            self._starts.release()
