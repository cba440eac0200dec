"""Named fault points, for proving that every step of every lifecycle operation cleans up after itself.

Lifecycle code marks its steps with ``faults.point("create.network")``. Normally that is one dict lookup.
A test arms a point in-process (``with faults.armed("create.network")``: the point raises
:class:`InjectedFault`) or, for crash tests of a manager running in another process, through the
environment: ``WRENBOX_FAULTS="pause.processed=crash"`` makes the process SIGKILL itself at that point
(``=fail`` raises instead). Names are ``<operation>.<step>``.

``faults.crash_point`` marks a moment only a crash can strike: nothing between it and the next step can
raise (a VM started but not yet on record, resources given back but the record not yet moved), so
raising there would test a failure that cannot happen, and leak what the step holds. It acts only when
armed with ``crash`` and is not recorded, so tests that fail each recorded step pass it by.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from wrenbox.errors import WrenboxError

__all__ = ["InjectedFault", "armed", "crash_point", "point", "recording"]

_ENV = "WRENBOX_FAULTS"


class InjectedFault(WrenboxError):
    """Raised at an armed fault point."""


def _from_env() -> dict[str, str]:
    spec = os.environ.get(_ENV, "")
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        out[name] = action or "fail"
    return out


_armed: dict[str, str] = _from_env()
_recording: list[str] | None = None


def point(name: str) -> None:
    """Mark a step. Raises or crashes if the step is armed."""
    if _recording is not None:
        _recording.append(name)
    action = _armed.get(name)
    if action is None:
        return
    if action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault at {name}")


def crash_point(name: str) -> None:
    """Mark a moment between steps where only a crash can strike: SIGKILL if armed with ``crash``."""
    if _armed.get(name) == "crash":
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def armed(name: str, action: str = "fail") -> Iterator[None]:
    _armed[name] = action
    try:
        yield
    finally:
        _armed.pop(name, None)


@contextmanager
def recording() -> Iterator[list[str]]:
    """Collect the names of the points passed inside the block (tests use it to enumerate steps)."""
    global _recording
    _recording, outer = [], _recording
    try:
        yield _recording
    finally:
        _recording = outer
