"""A thin layer over the ``qemu.qmp`` library: sessions with deadlines, and wrenbox errors.

One :func:`session` per operation (QEMU serves one monitor client at a time; a short session per
operation also survives a wrenbox restart and any event loop). ``why_gone`` is called to explain a QEMU
that died mid-operation (its log tails), so errors say what QEMU said.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from wrenbox.errors import Timeout, Unavailable, WrenboxError

__all__ = ["Qmp", "session"]

log = logging.getLogger(__name__)

_CONNECT_RETRY_S = 0.005


class Qmp:
    """A connected monitor. :meth:`run` executes one command and returns its ``return`` value."""

    def __init__(self, client: QMPClient, *, command_timeout: float, why_gone: Callable[[], str]) -> None:
        self._client = client
        self._timeout = command_timeout
        self._why_gone = why_gone

    async def run(self, command: str, timeout: float | None = None, **arguments: Any) -> Any:
        try:
            async with asyncio.timeout(timeout or self._timeout):
                return await self._client.execute(command, arguments or None)
        except ExecuteError as exc:
            raise WrenboxError(f"QEMU refused {command!r}: {exc}") from exc
        except QMPError as exc:  # disconnected: QEMU exited or closed the monitor
            raise Unavailable(f"QEMU went away during {command!r}{self._why_gone()}") from exc
        except TimeoutError:
            raise Timeout(f"QEMU did not answer {command!r} within {timeout or self._timeout} s") from None

    async def send_fd(self, fd: int, name: str) -> None:
        """Pass open descriptor ``fd`` to QEMU under ``name`` (for ``fd:<name>`` URIs)."""
        try:
            self._client.send_fd_scm(fd)
        except (OSError, QMPError) as exc:
            raise Unavailable(f"cannot pass a descriptor to QEMU: {exc}{self._why_gone()}") from exc
        await self.run("getfd", fdname=name)

    async def wait_migration(self, timeout: float) -> dict[str, Any]:
        """Poll ``query-migrate`` (outgoing side) until it completed; raise if it failed or timed out."""
        deadline = time.monotonic() + timeout
        while True:
            info = await self.run("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise WrenboxError(f"QEMU migration {status}: {info.get('error-desc', 'no reason given')}")
            if time.monotonic() > deadline:
                raise Timeout(f"QEMU migration still {status} after {timeout:.0f} s")
            await asyncio.sleep(0.002)

    async def wait_status(self, wanted: set[str], passing: set[str], timeout: float) -> str:
        """Poll ``query-status`` until the run state is in ``wanted``; any state outside ``passing`` fails."""
        deadline = time.monotonic() + timeout
        while True:
            status = (await self.run("query-status"))["status"]
            if status in wanted:
                return status
            if status not in passing:
                raise WrenboxError(f"QEMU is {status!r}, expected {' or '.join(sorted(wanted))}")
            if time.monotonic() > deadline:
                raise Timeout(f"QEMU still {status!r} after {timeout:.0f} s")
            await asyncio.sleep(0.002)


@contextlib.asynccontextmanager
async def session(
    socket: Path,
    *,
    alive: Callable[[], bool],
    why_gone: Callable[[], str] = str,
    connect_timeout: float = 10.0,
    command_timeout: float = 10.0,
) -> AsyncIterator[Qmp]:
    """Connect to the monitor at ``socket``, retrying while QEMU starts up (it must stay ``alive``)."""
    client = QMPClient(socket.name)
    deadline = time.monotonic() + connect_timeout
    while True:
        error: BaseException | None = None
        # Until QEMU created the socket there is nothing to try (and qemu.qmp logs every failure).
        if socket.exists():  # noqa: ASYNC240 (one stat of a local file)
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                    await client.connect(str(socket))
                break
            except (QMPError, OSError, TimeoutError) as exc:
                error = exc
        if not alive():
            raise Unavailable(f"QEMU exited before its monitor answered{why_gone()}") from error
        if time.monotonic() >= deadline:
            raise Timeout(f"QEMU monitor {socket} did not answer within {connect_timeout} s") from error
        await asyncio.sleep(_CONNECT_RETRY_S)
    try:
        yield Qmp(client, command_timeout=command_timeout, why_gone=why_gone)
    finally:
        # A QEMU that quit leaves the reader task with EOFError; that is the expected ending here.
        with contextlib.suppress(Exception):
            await client.disconnect()
