"""Processes started for clients: spawning, output fan-out with a replay ring, input, signals, exit.

A :class:`ManagedProcess` belongs to the agent, never to the request that started it: a client that
disconnects or whose stream deadline passes only loses its :class:`Subscription`; the process runs on
and can be reattached by pid or tag. Each process keeps its most recent output in a bounded ring, so an
attach replays it before following live output.

Output is read with non-blocking fds on the event loop and exit is noticed through a pidfd, so there
is no thread per process and every child is reaped. One slow subscriber never blocks a process for
long: reading pauses while a subscriber is more than ``high_water`` bytes behind (backpressure for a
client that is consuming, just slowly) and a subscriber that makes no progress for ``stall_timeout``
seconds is dropped with an error, after which output flows again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeAlias

from wrenbox.errors import Conflict, InvalidArgument, NotFound, Unavailable, WrenboxError

from . import pty
from .spawn import Launched, OutputKind, Spawn, launch

__all__ = ["Exit", "ManagedProcess", "Output", "ProcessLimits", "ProcessTable", "Subscription"]

Output: TypeAlias = tuple[OutputKind, bytes]

PIPE_CHUNK = 32 * 1024  # as envd: 32 KiB reads from pipes, 16 KiB from a PTY
PTY_CHUNK = 16 * 1024


@dataclass(frozen=True, slots=True)
class ProcessLimits:
    ring_bytes: int = 1 << 20
    high_water: int = 8 << 20
    low_water: int = 1 << 20
    stall_timeout: float = 10.0
    exited_retention: float = 60.0  # seconds an exited process stays attachable (its ring replays)
    max_exited: int = 256  # and at most this many: each holds up to ring_bytes of output


@dataclass(frozen=True, slots=True)
class Exit:
    """How a process ended, in envd's words (Go's ProcessState: "exit status 1", "signal: killed")."""

    exit_code: int
    exited: bool
    status: str
    error: str | None

    @classmethod
    def from_returncode(cls, returncode: int) -> Exit:
        if returncode >= 0:
            status = f"exit status {returncode}"
            return cls(returncode, True, status, status if returncode else None)
        name = (signal.strsignal(-returncode) or f"signal {-returncode}").lower()
        return cls(-1, False, f"signal: {name}", f"signal: {name}")


class Subscription:
    """One client's view of a process: replayed output, then live output, then the exit."""

    def __init__(self, process: ManagedProcess) -> None:
        self.process = process
        self.pending_bytes = 0
        self.last_progress = time.monotonic()
        self._items: deque[Output | Exit | WrenboxError] = deque()
        self._wakeup = asyncio.Event()

    def push(self, item: Output | Exit | WrenboxError) -> None:
        self._items.append(item)
        if isinstance(item, tuple):
            self.pending_bytes += len(item[1])
        self._wakeup.set()

    async def next(self, timeout: float | None) -> Output | Exit | None:
        """The next item, or None if nothing arrived within ``timeout`` seconds."""
        if not self._items:
            self._wakeup.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                return None
        item = self._items.popleft()
        if isinstance(item, WrenboxError):
            raise item
        if isinstance(item, tuple):
            self.pending_bytes -= len(item[1])
            self.last_progress = time.monotonic()
            self.process.consumed()
        return item

    def close(self) -> None:
        self.process.unsubscribe(self)


class ManagedProcess:
    def __init__(
        self,
        launched: Launched,
        spawn: Spawn,
        config: object,
        limits: ProcessLimits,
        on_finish: Callable[[ManagedProcess], None],
    ) -> None:
        popen, outputs, input_fd = launched.popen, launched.outputs, launched.input_fd
        self.pid = popen.pid
        self.tag = spawn.tag
        self.config = config  # the request's ProcessConfig, reported back by List
        self.is_pty = spawn.pty_size is not None
        self.exit: Exit | None = None
        self._popen = popen
        self._limits = limits
        self._loop = asyncio.get_running_loop()
        self._outputs = dict(outputs)
        self._input_fd = input_fd
        self._input_lock = asyncio.Lock()
        self._on_finish = on_finish
        self._ring: deque[Output] = deque()
        self._ring_bytes = 0
        self._subscribers: list[Subscription] = []
        self._paused = False
        self._stall_check: asyncio.TimerHandle | None = None
        self._pidfd = os.pidfd_open(self.pid)
        self._loop.add_reader(self._pidfd, self._on_exit)
        self._start_reading()

    @property
    def running(self) -> bool:
        return self.exit is None

    # -- output -------------------------------------------------------------------------------

    def subscribe(self, replay: bool) -> Subscription:
        """Follow this process; with ``replay`` the ring's recent output comes first."""
        sub = Subscription(self)
        if replay:
            for item in self._ring:
                sub.push(item)
        if self.exit is not None:
            sub.push(self.exit)
        else:
            self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(sub)
        self.consumed()

    def consumed(self) -> None:
        if self._paused and all(s.pending_bytes <= self._limits.low_water for s in self._subscribers):
            self._resume()

    def _start_reading(self) -> None:
        for fd, kind in self._outputs.items():
            self._loop.add_reader(fd, self._read, fd, kind)

    def _stop_reading(self) -> None:
        for fd in self._outputs:
            self._loop.remove_reader(fd)

    def _read(self, fd: int, kind: OutputKind) -> None:
        try:
            data = os.read(fd, PTY_CHUNK if kind == "pty" else PIPE_CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO: the PTY's slave side is closed
            data = b""
        if data:
            self._publish((kind, data))
        else:
            self._close_output(fd)

    def _publish(self, item: Output) -> None:
        self._ring.append(item)
        self._ring_bytes += len(item[1])
        while self._ring_bytes > self._limits.ring_bytes and len(self._ring) > 1:
            self._ring_bytes -= len(self._ring.popleft()[1])
        for sub in self._subscribers:
            sub.push(item)
            if sub.pending_bytes > self._limits.high_water and not self._paused:
                self._pause()

    def _pause(self) -> None:
        self._paused = True
        self._stop_reading()
        self._stall_check = self._loop.call_later(self._limits.stall_timeout, self._drop_stalled)

    def _resume(self) -> None:
        self._paused = False
        if self._stall_check is not None:
            self._stall_check.cancel()
            self._stall_check = None
        if self.exit is None:
            self._start_reading()

    def _drop_stalled(self) -> None:
        self._stall_check = None
        now = time.monotonic()
        for sub in list(self._subscribers):
            lagging = sub.pending_bytes > self._limits.high_water
            if lagging and now - sub.last_progress >= self._limits.stall_timeout:
                self._subscribers.remove(sub)
                sub.push(Unavailable("client stopped reading the output; reattach to get recent output"))
        if all(s.pending_bytes <= self._limits.low_water for s in self._subscribers):
            self._resume()
        else:
            self._stall_check = self._loop.call_later(self._limits.stall_timeout, self._drop_stalled)

    def _close_output(self, fd: int) -> None:
        if self._outputs.pop(fd, None) is not None:
            self._loop.remove_reader(fd)
            if fd != self._input_fd:
                os.close(fd)

    # -- exit ---------------------------------------------------------------------------------

    def _on_exit(self) -> None:
        returncode = self._popen.poll()
        if returncode is None:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        # What the process wrote before exiting is already in the pipe; a grandchild that keeps
        # the pipe open does not hold up the exit (Go's cmd.Wait behaves the same).
        for fd, kind in list(self._outputs.items()):
            self._drain(fd, kind)
            self._close_output(fd)
        self._close_input()
        if self._stall_check is not None:
            self._stall_check.cancel()
        self.exit = Exit.from_returncode(returncode)
        for sub in self._subscribers:
            sub.push(self.exit)
        self._subscribers.clear()
        self._on_finish(self)

    def _drain(self, fd: int, kind: OutputKind) -> None:
        while True:
            try:
                data = os.read(fd, PTY_CHUNK if kind == "pty" else PIPE_CHUNK)
            except OSError:
                return
            if not data:
                return
            self._publish((kind, data))

    # -- input, signals, terminal ---------------------------------------------------------------

    async def write_input(self, data: bytes, *, pty: bool) -> None:
        if pty != self.is_pty:
            raise Conflict(
                "this process has a PTY: send input as pty data"
                if self.is_pty
                else "this process has no PTY: send input as stdin data"
            )
        async with self._input_lock:
            fd = self._input_fd
            if fd is None:
                raise Conflict("stdin of this process is not open (start it with stdin=true)")
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    await self._writable(fd)
                except (BrokenPipeError, OSError) as err:
                    raise Conflict(f"process {self.pid} does not accept input: {err.strerror}") from None

    async def _writable(self, fd: int) -> None:
        ready = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self._loop.add_writer(fd, wake)
        try:
            await ready
        finally:
            self._loop.remove_writer(fd)

    def close_stdin(self) -> None:
        if self.is_pty:
            raise Conflict("a PTY has no separate stdin: send Ctrl+D (0x04) as input instead")
        self._close_input()

    def _close_input(self) -> None:
        fd, self._input_fd = self._input_fd, None
        if fd is not None and fd not in self._outputs:
            os.close(fd)

    def resize(self, cols: int, rows: int) -> None:
        master = self._input_fd if self.is_pty else None
        if master is None:
            raise Conflict("this process has no PTY to resize")
        pty.set_size(master, cols, rows)

    def signal(self, sig: int) -> None:
        """Signal the process group the process leads (its children too), while it runs."""
        if self.exit is not None:
            raise NotFound(f"process {self.pid} has already exited")
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            os.kill(self.pid, sig)  # left its group: signal the process itself


class ProcessTable:
    """Running processes by pid (and tag), plus recently exited ones kept for reattaching."""

    def __init__(self, limits: ProcessLimits) -> None:
        self.limits = limits
        self._running: dict[int, ManagedProcess] = {}
        self._exited: dict[int, ManagedProcess] = {}

    def __iter__(self) -> Iterator[ManagedProcess]:
        return iter(list(self._running.values()))

    def start(self, spawn: Spawn, config: object) -> ManagedProcess:
        if spawn.tag is not None and any(p.tag == spawn.tag for p in self._running.values()):
            raise InvalidArgument(f"a running process already has the tag {spawn.tag!r}")
        launched = launch(spawn)
        process = ManagedProcess(launched, spawn, config, self.limits, self._finished)
        self._running[process.pid] = process
        self._exited.pop(process.pid, None)
        return process

    def find(self, pid: int | None = None, tag: str | None = None, *, exited: bool = False) -> ManagedProcess:
        """The running process with this pid or tag (``exited``: or one that ended recently)."""
        pools = (self._running, self._exited) if exited else (self._running,)
        for pool in pools:
            for process in pool.values():
                if (pid is not None and process.pid == pid) or (tag is not None and process.tag == tag):
                    return process
        what = f"pid {pid}" if pid is not None else f"tag {tag!r}"
        raise NotFound(f"no running process with {what}")

    def kill_all(self) -> None:
        for process in self._running.values():
            with contextlib.suppress(OSError, WrenboxError):
                process.signal(signal.SIGKILL)

    def _finished(self, process: ManagedProcess) -> None:
        if self._running.get(process.pid) is process:
            del self._running[process.pid]
            self._exited[process.pid] = process
            while len(self._exited) > self.limits.max_exited:
                del self._exited[next(iter(self._exited))]  # the oldest
            loop = asyncio.get_running_loop()
            loop.call_later(self.limits.exited_retention, self._forget, process)

    def _forget(self, process: ManagedProcess) -> None:
        if self._exited.get(process.pid) is process:
            del self._exited[process.pid]
