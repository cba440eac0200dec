"""Noticing at once that a VMM process ended on its own (killed by the OOM killer or an operator, crashed,
its guest powered off), while the manager runs.

One pidfd per watched process, registered with the event loop: it becomes readable when the process
exits, whether it is our child (started by this process) or adopted after a restart (a child's wait
would only cover the first). The identity check after ``pidfd_open`` (:meth:`ProcessRef.alive`) makes
sure the descriptor is the process on record, not a reused PID. A process is unwatched before wrenbox
ends it itself, so only exits nobody asked for are reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator

import anyio

from wrenbox.pids import ProcessRef

__all__ = ["ExitWatch"]

log = logging.getLogger(__name__)


class ExitWatch:
    """Watches processes by key (a sandbox id); :meth:`exits` yields the key of each one that ended."""

    def __init__(self) -> None:
        self._fds: dict[str, tuple[int, asyncio.AbstractEventLoop]] = {}
        self._send, self._receive = anyio.create_memory_object_stream[str](math.inf)

    def watch(self, key: str, process: ProcessRef) -> None:
        """Report ``key`` when ``process`` ends (at once if it already has). Call on the event loop."""
        self.unwatch(key)
        try:
            fd = os.pidfd_open(process.pid)
        except ProcessLookupError:
            self._send.send_nowait(key)
            return
        if not process.alive():  # ended, or the PID is someone else's now
            os.close(fd)
            self._send.send_nowait(key)
            return
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, self._ended, key)
        self._fds[key] = (fd, loop)

    def unwatch(self, key: str) -> None:
        """Stop watching ``key`` (before ending its process on purpose); idempotent."""
        entry = self._fds.pop(key, None)
        if entry is None:
            return
        fd, loop = entry
        with contextlib.suppress(RuntimeError):  # that loop is closed: nothing is registered any more
            loop.remove_reader(fd)
        os.close(fd)

    def watching(self, key: str) -> bool:
        return key in self._fds

    async def exits(self) -> AsyncIterator[str]:
        async for key in self._receive:
            yield key

    def close(self) -> None:
        for key in list(self._fds):
            self.unwatch(key)

    def _ended(self, key: str) -> None:
        self.unwatch(key)
        log.warning("the VMM of sandbox %s exited on its own", key)
        self._send.send_nowait(key)
