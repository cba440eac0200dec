"""The UFFD page server: lazy guest memory for a VM restored by Firecracker with a ``Uffd`` memory backend.

One server per restored VM, owned by the sandbox record::

    server = PageServer(run_dir / "uffd.sock", FileSource(snapshot_dir / "memfile"))
    server.start()                      # listening; returns at once
    firecracker.load_snapshot(..., mem_backend={"backend_type": "Uffd", "backend_path": ...})
    server.wait_ready(timeout=5)        # the hand-off arrived and checked out, or its error is raised
    ...
    server.stop()                       # after the VM is gone: closes the uffd, the socket, the source

(or ``with PageServer(...) as server:``). The server accepts exactly one connection, takes Firecracker's
hand-off (:mod:`wrenbox.memory.uffd.handshake`), closes that connection, then answers faults and events
and prefetches on its one thread (:mod:`wrenbox.memory.uffd.pager`). Memory comes from a
:class:`PageSource` (:mod:`wrenbox.memory.uffd.source`), which the server owns from construction on.

``stop()`` works in every state: never started, waiting for a VMM that never connects, in the middle of a
hand-off, serving, after the VMM died. It closes everything the server holds. Firecracker keeps its own
uffd descriptor, so a VM that still runs after ``stop()`` blocks on its next fault of a page never
served: stop the server after the VM is gone (or once :attr:`PageServerStats.prefetch_done`).
A failure (bad hand-off, a source reporting corrupt data, an unexpected ioctl error) ends serving but
keeps the uffd open until ``stop()``, so the VM blocks rather than runs on wrong memory; the owner sees
:attr:`PageServer.error` and should destroy the VM.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import select
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from wrenbox.errors import AlreadyExists, Conflict, InvalidArgument, Timeout, WrenboxError
from wrenbox.memory.uffd.handshake import GuestRegion, parse_regions, receive_handshake
from wrenbox.memory.uffd.pager import Pager, PageServerStats, PeerGone
from wrenbox.memory.uffd.source import BLOCK_SIZE, Extent, FileSource, PageSource

__all__ = [
    "Extent",
    "FileSource",
    "GuestRegion",
    "PageServer",
    "PageServerConfig",
    "PageServerStats",
    "PageSource",
    "ServerState",
]

log = logging.getLogger(__name__)

_MAX_CHUNK = 2 << 20
_MAX_PREFETCH_CHUNK = 64 << 20
_MAX_SUN_PATH = 107


def _power_of_two(value: int, low: int, high: int, name: str) -> None:
    if type(value) is not int or not low <= value <= high or value & (value - 1):
        raise InvalidArgument(f"{name} must be a power of two from {low} to {high} bytes, got {value!r}")


@dataclass(frozen=True, slots=True)
class PageServerConfig:
    chunk_size: int = 256 * 1024
    """Bytes served per fault, aligned within the region (4 KiB-2 MiB; 4 KiB is per-page serving)."""
    prefetch: bool = True
    """Fill all remaining memory in the background once the hand-off is done."""
    prefetch_chunk_size: int = 2 << 20
    accept_timeout: float | None = 60.0
    """Seconds to wait for the VMM to connect (None: until stopped)."""
    handshake_timeout: float = 5.0
    """Seconds from connect until the complete hand-off message."""
    max_handshake_bytes: int = 1 << 20
    socket_mode: int = 0o600

    def __post_init__(self) -> None:
        _power_of_two(self.chunk_size, BLOCK_SIZE, _MAX_CHUNK, "chunk_size")
        _power_of_two(self.prefetch_chunk_size, BLOCK_SIZE, _MAX_PREFETCH_CHUNK, "prefetch_chunk_size")
        if self.accept_timeout is not None and not self.accept_timeout > 0:
            raise InvalidArgument(f"accept_timeout must be positive or None, got {self.accept_timeout!r}")
        if not self.handshake_timeout > 0:
            raise InvalidArgument(f"handshake_timeout must be positive, got {self.handshake_timeout!r}")
        if not BLOCK_SIZE <= self.max_handshake_bytes <= 64 << 20:
            raise InvalidArgument(f"max_handshake_bytes out of range: {self.max_handshake_bytes!r}")
        if not 0 <= self.socket_mode <= 0o777:
            raise InvalidArgument(f"socket_mode must be a permission mode, got {self.socket_mode!r}")


class ServerState(enum.Enum):
    CREATED = "created"
    LISTENING = "listening"
    SERVING = "serving"
    FINISHED = "finished"
    """The VMM's address space is gone; nothing is left to serve."""
    FAILED = "failed"
    STOPPED = "stopped"


class _Stopped(Exception):
    """stop() was called while the server thread waited (not an error)."""


class PageServer:
    """Serves one VMM's guest memory from a :class:`PageSource` over userfaultfd.

    Once constructed, the server owns ``source``: :meth:`stop` closes it.
    """

    def __init__(
        self, socket_path: str | os.PathLike[str], source: PageSource, config: PageServerConfig | None = None
    ) -> None:
        self.socket_path = Path(socket_path)
        if len(os.fsencode(self.socket_path)) > _MAX_SUN_PATH:
            raise InvalidArgument(f"socket path {self.socket_path} is longer than {_MAX_SUN_PATH} bytes")
        self.config = config or PageServerConfig()
        self._source = source
        self._state = ServerState.CREATED
        self._error: WrenboxError | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._released = False
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._socket_inode: int | None = None
        self._wake_r = self._wake_w = -1
        self._uffd = -1
        self._regions: tuple[GuestRegion, ...] = ()
        self._pager: Pager | None = None
        self.peer_pid: int | None = None
        """Process id of the VMM that connected (SO_PEERCRED), once it has."""

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def error(self) -> WrenboxError | None:
        """Why serving failed, if it did."""
        return self._error

    @property
    def regions(self) -> tuple[GuestRegion, ...]:
        """The guest memory regions of the hand-off (empty before it)."""
        return self._regions

    @property
    def stats(self) -> PageServerStats:
        pager = self._pager
        return PageServerStats() if pager is None else pager.stats

    def start(self) -> None:
        """Listen on the socket and serve in a background thread; returns at once."""
        with self._lock:
            if self._state is not ServerState.CREATED:
                raise Conflict(f"page server on {self.socket_path} can be started only once")
            try:
                self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                self._listener = self._listen()
                self._thread = threading.Thread(
                    target=self._run, name=f"uffd:{self.socket_path.name}", daemon=True
                )
                self._state = ServerState.LISTENING
                self._thread.start()
            except BaseException:
                self._state = ServerState.STOPPED
                self._release()
                raise

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the VMM's hand-off was accepted; raise the server's error if it was not."""
        if not self._ready.wait(timeout):
            raise Timeout(f"no VMM handed its memory to {self.socket_path} within {timeout} s")
        if self._error is not None:
            raise self._error
        if not self._regions:
            raise Conflict(f"page server on {self.socket_path} was stopped before a VMM connected")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and close everything (idempotent; safe in every state)."""
        with self._lock:
            self._stop.set()
            if self._wake_w >= 0:
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_w, b"\0")
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                # It releases everything itself when it gets out of whatever it is stuck in.
                raise Timeout(f"page server thread {thread.name} did not stop within {timeout} s")
        with self._lock:
            if self._state is not ServerState.FAILED:
                self._state = ServerState.STOPPED
            self._release()

    def __enter__(self) -> PageServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- resources ------------------------------------------------------------------------------------

    def _listen(self) -> socket.socket:
        path = self.socket_path
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise AlreadyExists(f"{path} exists and is not a socket; refusing to replace it")
            path.unlink()  # a stale socket from an earlier run
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(os.fspath(path))
            self._socket_inode = os.lstat(path).st_ino
            path.chmod(self.config.socket_mode)
            listener.listen(1)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        return listener

    def _release(self) -> None:
        """Close whatever is open (with the lock held; idempotent)."""
        if self._released:
            return
        self._released = True
        for closer in (self._close_listener, self._unlink_socket, self._close_fds, self._source.close):
            try:
                closer()
            except Exception:
                log.exception("page server %s: releasing resources", self.socket_path)
        self._ready.set()

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _unlink_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self._socket_inode is not None and os.lstat(self.socket_path).st_ino == self._socket_inode:
                self.socket_path.unlink()

    def _close_fds(self) -> None:
        if self._pager is not None:
            self._pager.close()
        for fd in (self._uffd, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._uffd = self._wake_r = self._wake_w = -1

    # -- the server thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            conn = self._accept()
            with conn:
                pager = self._take_handoff(conn)
            # The connection is closed now: a VMM-side caller waiting on it knows the hand-off is done.
            self._state = ServerState.SERVING
            self._ready.set()
            log.info("page server %s: serving pid %s", self.socket_path.name, self.peer_pid)
            pager.serve(self._stop, prefetch=self.config.prefetch)
        except _Stopped:
            pass
        except PeerGone:
            self._state = ServerState.FINISHED
            log.info("page server %s: the VMM's memory is gone", self.socket_path.name)
        except WrenboxError as exc:
            self._fail(exc)
        except Exception as exc:
            log.exception("page server %s failed", self.socket_path)
            self._fail(WrenboxError(f"page server failed: {exc}"))
        finally:
            self._ready.set()
            with self._lock:
                if self._stop.is_set():
                    self._release()

    def _fail(self, exc: WrenboxError) -> None:
        log.error("page server %s: %s", self.socket_path, exc.message)
        self._error = exc
        self._state = ServerState.FAILED

    def _wait_readable(self, fd: int, timeout: float | None) -> bool:
        """Poll ``fd`` and the wake pipe: True if ``fd`` is readable, False on timeout, _Stopped on stop."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        events = dict(poller.poll(None if timeout is None else max(timeout, 0) * 1000))
        if self._stop.is_set() or self._wake_r in events:
            raise _Stopped
        return bool(events)

    def _accept(self) -> socket.socket:
        assert self._listener is not None
        timeout = self.config.accept_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if not self._wait_readable(self._listener.fileno(), remaining):
                raise Timeout(f"no VMM connected to {self.socket_path} within {timeout} s")
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                continue
            with self._lock:
                self._close_listener()  # one VMM per server; later connects are refused
            return conn

    def _take_handoff(self, conn: socket.socket) -> Pager:
        conn.setblocking(False)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)  # struct ucred {pid, uid, gid}
        self.peer_pid = int.from_bytes(creds[:4], "little")
        payload, uffd = receive_handshake(
            conn,
            timeout=self.config.handshake_timeout,
            max_bytes=self.config.max_handshake_bytes,
            wait=self._wait_readable,
        )
        self._uffd = uffd  # from here on stop() closes it, whatever happens next
        os.set_blocking(uffd, False)
        self._regions = parse_regions(payload, self._source.size)
        self._pager = Pager(
            uffd,
            self._regions,
            self._source,
            self._wait_readable,
            chunk_size=self.config.chunk_size,
            prefetch_chunk_size=self.config.prefetch_chunk_size,
            name=self.socket_path.name,
        )
        return self._pager
