"""The resource ledger: what a sandbox holds, written down before it is used.

A lifecycle operation holds a :class:`Ledger` for one sandbox. ``hold(key, value)`` records a host
resource (network slot, disk, VM process, ...) in the sandbox's persisted ``resources`` *before* the
resource is created, and registers its release as the undo. If the operation fails, the undos run newest
first (:class:`wrenbox.rollback.Rollback`); if the process dies instead, the next manager finds the
resource in the store and reclaims it. Either way nothing is leaked silently: a release that fails stays
in ``resources`` and is named in ``leftovers``.

Releasing a resource is always ``releaser(record, key, value)`` — the same call whether it comes from a
rollback, a destroy, a pause, or a reclaim after a crash — and must be idempotent (the resource may be
half-created or already gone).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol

from wrenbox.records import SandboxRecord
from wrenbox.rollback import Rollback

__all__ = ["Ledger", "RecordSink", "Releaser"]


class Releaser(Protocol):
    def __call__(self, rec: SandboxRecord, key: str, value: Any, /) -> Awaitable[None]: ...


class RecordSink(Protocol):
    def save_sandbox(self, rec: SandboxRecord) -> None: ...


class Ledger:
    """Use as ``async with Ledger(...) as ledger:``; call :meth:`commit` when the operation succeeded."""

    def __init__(self, store: RecordSink, rec: SandboxRecord, releaser: Releaser, label: str) -> None:
        self.store = store
        self.rec = rec
        self._release_fn = releaser
        self._rollback = Rollback(f"{label} of sandbox {rec.id}")
        self.leftovers: list[str] = []

    def hold(self, key: str, value: Any) -> None:
        """Record that the sandbox is about to hold ``key`` (described by JSON-able ``value``)."""
        self.rec.resources[key] = value
        self.store.save_sandbox(self.rec)
        self._rollback.push(key, self.release, key)

    def update(self, key: str, value: Any) -> None:
        """Refine what is recorded for a held resource (e.g. the PID once the VM started)."""
        self.rec.resources[key] = value
        self.store.save_sandbox(self.rec)

    async def release(self, key: str) -> None:
        """Give back one held resource now (normal flow, e.g. pause stops the VM)."""
        if key not in self.rec.resources:
            return
        await self._release_fn(self.rec, key, self.rec.resources[key])
        del self.rec.resources[key]
        self.store.save_sandbox(self.rec)

    def on_failure(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Register a compensating action that is not a resource release (e.g. continue a stopped VM)."""
        self._rollback.push(what, fn, *args)

    def commit(self) -> None:
        self._rollback.commit()

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            await self._rollback.__aexit__(et, exc, tb)  # shielded unwind; sets exc.leftovers
            self.leftovers = exc.leftovers  # type: ignore[attr-defined]
