"""The one rollback mechanism of wrenbox.

Every step that acquires something registers how to give it back; if a later step fails, the undos run
newest first. An undo that fails is logged and reported as a *leftover* (what it was meant to release), so
the caller can record it for a later reclaim instead of leaking it silently::

    async with Rollback("create sandbox abc") as rb:
        slot = await slots.allocate()
        rb.push(f"network slot {slot}", slots.release, slot)
        vm = await driver.restore(...)
        rb.push(f"vm pid {vm.pid}", vm.destroy)
        ...
        rb.commit()          # success: keep everything

If the block raises before ``commit()``, the undos run and the exception propagates with the leftovers
attached as ``exc.leftovers`` (an empty list when everything was released).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio

__all__ = ["Rollback", "Undo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Undo:
    what: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]


class Rollback:
    """An undo log usable as a sync or async context manager (undos may be sync or async callables)."""

    def __init__(self, label: str = "") -> None:
        self.label = label
        self._undos: list[Undo] = []

    def push(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Register ``fn(*args)`` as the way to release ``what``."""
        self._undos.append(Undo(what, fn, args))

    def commit(self) -> None:
        """The operation succeeded: forget every undo."""
        self._undos.clear()

    def __len__(self) -> int:
        return len(self._undos)

    def _pop_all(self) -> list[Undo]:
        undos, self._undos = self._undos[::-1], []
        return undos

    def _failed(self, undo: Undo, exc: BaseException) -> str:
        log.error(
            "rollback%s: could not release %s: %s",
            f" of {self.label}" if self.label else "",
            undo.what,
            exc,
            exc_info=exc,
        )
        return undo.what

    def unwind(self) -> list[str]:
        """Run the undos newest first; return what could not be released. Sync undos only."""
        leftovers = []
        for undo in self._pop_all():
            try:
                result = undo.fn(*undo.args)
                if inspect.iscoroutine(result):
                    result.close()
                    raise TypeError("async undo in a sync rollback; use 'async with' / aunwind()")
            except Exception as exc:
                leftovers.append(self._failed(undo, exc))
        return leftovers

    async def aunwind(self) -> list[str]:
        """Run the undos newest first, awaiting async ones; return what could not be released."""
        leftovers = []
        for undo in self._pop_all():
            try:
                result = undo.fn(*undo.args)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                leftovers.append(self._failed(undo, exc))
        return leftovers

    def __enter__(self) -> Rollback:
        return self

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            exc.leftovers = self.unwind()  # type: ignore[attr-defined]

    async def __aenter__(self) -> Rollback:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            # A cancelled operation must still give everything back: the unwind is shielded.
            with anyio.CancelScope(shield=True):
                exc.leftovers = await self.aunwind()  # type: ignore[attr-defined]
