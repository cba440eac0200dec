"""The UFFD page server: lazy guest memory for a VM restored by Firecracker with a ``Uffd`` memory backend.

One server per restored VM, owned by the sandbox record::

    server = PageServer(run_dir / "uffd.sock", FileSource(snapshot_dir / "memfile"))
    server.start()                      # listening; returns at once
    firecracker.load_snapshot(..., mem_backend={"backend_type": "Uffd", "backend_path": ...})
    server.wait_ready(timeout=5)        # the hand-off arrived and checked out, or its error is raised
    ...
    server.stop()                       # after the VM is gone: closes the uffd, the socket, the source

(or ``with PageServer(...) as server:``). The server accepts exactly one connection, takes Firecracker's
hand-off (:mod:`wrenbox.memory.uffd_handshake`), then runs one event loop on one thread:

* a page fault is answered for its whole aligned *chunk* (``chunk_size``, clamped to the region), since
  one large ``UFFDIO_COPY`` costs about what one 4 KiB copy costs in Python overhead; data comes straight
  from the source's mapping, holes get ``UFFDIO_ZEROPAGE`` (hugetlbfs has none: copied from zeros);
* ``UFFD_EVENT_REMOVE`` (balloon, ``madvise(MADV_DONTNEED)``) marks the range removed: it reads as zeros
  from then on and is never filled with snapshot content again; ``UFFD_EVENT_UNMAP`` marks it gone;
* a copy that meets a present page (``EEXIST``) skips it and wakes its waiters; a copy refused while the
  address space changes (``EAGAIN``) reads the pending events first, then retries what is still needed;
* with nothing to answer, it prefetches the rest of memory in ``prefetch_chunk_size`` steps, one step
  between two looks at the uffd, so faults always go first.

Every other event the VMM may have negotiated is survived (a forked uffd is closed). The page state per
region is one byte per page: missing, present, removed, gone.

``stop()`` works in every state: never started, waiting for a VMM that never connects, in the middle of a
hand-off, serving, after the VMM died. It closes everything the server holds. Stopping while the VM still
runs leaves its unserved memory to the kernel, which then maps zero pages: destroy the VM first.
A failure (bad hand-off, a source reporting corrupt data, an unexpected ioctl error) ends serving but
keeps the uffd open, so the VM blocks instead of reading zeros; the owner sees :attr:`PageServer.error`.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import logging
import os
import re
import select
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from wrenbox.errors import AlreadyExists, Conflict, InvalidArgument, Timeout, WrenboxError
from wrenbox.memory import uffd_abi
from wrenbox.memory.uffd_handshake import GuestRegion, Stopped, parse_regions, receive_handshake
from wrenbox.memory.uffd_source import BLOCK_SIZE, Extent, FileSource, PageSource

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
_BATCH = 64  # messages per read: one syscall drains what many vCPUs queued
_MISSING, _PRESENT, _REMOVED, _GONE = 0, 1, 2, 3
_TODO = re.compile(b"\x00+|\x02+")  # runs of pages to fill: missing (from the source) or removed (zeros)


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


@dataclass(frozen=True, slots=True)
class PageServerStats:
    faults: int = 0
    """Page-fault messages read."""
    fault_bytes: int = 0
    """Bytes filled to answer faults (whole chunks)."""
    prefetch_bytes: int = 0
    """Bytes filled by the background prefetch."""
    copied_bytes: int = 0
    zeroed_bytes: int = 0
    copy_calls: int = 0
    zeropage_calls: int = 0
    exists: int = 0
    """Copies that found a page already present (EEXIST)."""
    retries: int = 0
    """Copies stopped early or refused while the address space changed (EAGAIN)."""
    removes: int = 0
    unmaps: int = 0
    other_events: int = 0
    stray_faults: int = 0
    """Faults outside every region the VMM described (a VMM bug; logged)."""
    prefetch_done: bool = False


class _Counters:
    """The loop's mutable tallies (only the server thread writes them)."""

    def __init__(self) -> None:
        for f in fields(PageServerStats):
            setattr(self, f.name, f.default)

    def snapshot(self) -> PageServerStats:
        return PageServerStats(**{f.name: getattr(self, f.name) for f in fields(PageServerStats)})


class _Region:
    __slots__ = ("base", "chunk_pages", "end", "offset", "page_size", "pages", "state", "zeropage")

    def __init__(self, region: GuestRegion, chunk_size: int) -> None:
        self.base = region.base
        self.end = region.end
        self.offset = region.offset
        self.page_size = region.page_size
        self.pages = region.size // region.page_size
        self.chunk_pages = min(max(chunk_size // region.page_size, 1), self.pages)
        self.state = bytearray(self.pages)
        self.zeropage = region.page_size == BLOCK_SIZE  # hugetlbfs rejects UFFDIO_ZEROPAGE


class _Changing(Exception):
    """The kernel refused a fill while the address space changes; read the pending events first."""


class _PeerGone(Exception):
    """The VMM's address space no longer exists."""


class _NoZeroPage(Exception):
    """UFFDIO_ZEROPAGE is not supported on this memory (hugetlbfs): copy zeros instead."""


class PageServer:
    """Serves one VMM's guest memory from a :class:`PageSource` over userfaultfd. Owns the source."""

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
        self._lock = threading.Lock()
        self._stopping = False
        self._released = False
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._socket_inode: int | None = None
        self._wake_r = self._wake_w = -1
        self._uffd = -1
        self._regions: list[_Region] = []
        self._bases: list[int] = []
        self._deferred: list[int] = []
        self._prefetching = False
        self._zeros: uffd_abi.Mapping | None = None
        self._bounce: uffd_abi.Mapping | None = None
        self._counters = _Counters()
        self.peer_pid: int | None = None
        """Process id of the VMM that connected (SO_PEERCRED), once it has."""

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def error(self) -> WrenboxError | None:
        """Why serving failed, if it did."""
        return self._error

    @property
    def stats(self) -> PageServerStats:
        return self._counters.snapshot()

    @property
    def regions(self) -> tuple[GuestRegion, ...]:
        return tuple(GuestRegion(r.base, r.end - r.base, r.offset, r.page_size) for r in self._regions)

    def start(self) -> None:
        """Listen on the socket and serve in a background thread; returns at once."""
        with self._lock:
            if self._state is not ServerState.CREATED:
                raise Conflict(f"page server on {self.socket_path} was already started")
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
        if self._state is ServerState.STOPPED and not self._regions:
            raise Conflict(f"page server on {self.socket_path} was stopped before a VMM connected")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and close everything (idempotent; safe in every state)."""
        with self._lock:
            self._stopping = True
            if self._wake_w >= 0:
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_w, b"\0")
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                # It closes everything itself when it gets out of whatever it is stuck in.
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
        """Close whatever is open (call with the lock held; idempotent)."""
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
        for mapping in (self._zeros, self._bounce):
            if mapping is not None:
                mapping.close()
        for fd in (self._uffd, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._uffd = self._wake_r = self._wake_w = -1

    # -- the server thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            conn = self._accept()
            with conn:
                self._take_handoff(conn)
            # The connection is closed now: a VMM-side caller waiting on it knows the hand-off is done.
            self._state = ServerState.SERVING
            self._ready.set()
            log.info(
                "page server %s: serving pid %s, %d region(s)",
                self.socket_path.name,
                self.peer_pid,
                len(self._regions),
            )
            self._serve()
        except (Stopped, _PeerGone) as exc:
            if isinstance(exc, _PeerGone):
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
                if self._stopping:
                    self._release()

    def _fail(self, exc: WrenboxError) -> None:
        log.error("page server %s: %s", self.socket_path, exc.message)
        self._error = exc
        self._state = ServerState.FAILED

    def _wait_readable(self, fd: int, timeout: float | None) -> bool:
        """Poll ``fd`` and the wake pipe; Stopped on a stop request, False on timeout."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        events = dict(poller.poll(None if timeout is None else max(timeout, 0) * 1000))
        if self._stopping or self._wake_r in events:
            raise Stopped
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

    def _take_handoff(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        self.peer_pid = int.from_bytes(creds[:4], "little")
        payload, uffd = receive_handshake(
            conn,
            timeout=self.config.handshake_timeout,
            max_bytes=self.config.max_handshake_bytes,
            stop_fd=self._wake_r,
        )
        self._uffd = uffd  # from here on stop() closes it, whatever happens next
        os.set_blocking(uffd, False)
        regions = parse_regions(payload, self._source.size)
        self._regions = [_Region(r, self.config.chunk_size) for r in regions]
        self._bases = [r.base for r in self._regions]

    def _serve(self) -> None:
        prefetch = self._prefetch() if self.config.prefetch else None
        while not self._stopping:
            try:
                batch = os.read(self._uffd, uffd_abi.MSG_SIZE * _BATCH)
            except BlockingIOError:
                batch = b""
            if batch:
                self._handle(batch)
            elif prefetch is not None:
                if next(prefetch, None) is None:
                    prefetch = None
                    self._counters.prefetch_done = True
            else:
                self._wait_readable(self._uffd, None)

    # -- events ---------------------------------------------------------------------------------------

    def _handle(self, batch: bytes) -> None:
        self._dispatch(batch)
        while self._deferred:
            self._fault(self._deferred.pop())

    def _dispatch(self, batch: bytes, *, defer_faults: bool = False) -> None:
        counters = self._counters
        for at in range(0, len(batch), uffd_abi.MSG_SIZE):
            event, arg0, arg1, _ = uffd_abi.MSG.unpack_from(batch, at)
            if event == uffd_abi.EVENT_PAGEFAULT:  # arg0: flags, arg1: address
                counters.faults += 1
                if defer_faults:
                    self._deferred.append(arg1)
                else:
                    self._fault(arg1)
            elif event == uffd_abi.EVENT_REMOVE:  # [arg0, arg1)
                counters.removes += 1
                self._mark(arg0, arg1, _REMOVED)
            elif event == uffd_abi.EVENT_UNMAP:
                counters.unmaps += 1
                self._mark(arg0, arg1, _GONE)
            else:
                counters.other_events += 1
                if event == uffd_abi.EVENT_FORK:  # the child's new uffd landed in our fd table
                    os.close(arg0 & 0xFFFFFFFF)
                log.warning("page server %s: ignoring uffd event %#x", self.socket_path.name, event)

    def _drain(self) -> None:
        """Read events that are pending (or about to be) while we are in the middle of a fill."""
        self._wait_readable(self._uffd, 0.01)
        try:
            batch = os.read(self._uffd, uffd_abi.MSG_SIZE * _BATCH)
        except BlockingIOError:
            return
        self._dispatch(batch, defer_faults=True)

    def _region_at(self, address: int) -> _Region | None:
        regions = self._regions
        if len(regions) == 1:
            r = regions[0]
            return r if r.base <= address < r.end else None
        lo, hi = 0, len(regions)
        while lo < hi:  # bisect over the region bases
            mid = (lo + hi) // 2
            if self._bases[mid] <= address:
                lo = mid + 1
            else:
                hi = mid
        r = regions[lo - 1] if lo else None
        return r if r is not None and address < r.end else None

    def _mark(self, start: int, end: int, value: int) -> None:
        for r in self._regions:
            lo, hi = max(start, r.base), min(end, r.end)
            if lo < hi:
                first = (lo - r.base) // r.page_size
                last = -(-(hi - r.base) // r.page_size)
                r.state[first:last] = bytes([value]) * (last - first)

    def _fault(self, address: int) -> None:
        r = self._region_at(address)
        page = -1 if r is None else (address - r.base) // r.page_size
        if r is None or r.state[page] == _GONE:
            self._counters.stray_faults += 1
            log.error(
                "page server %s: fault at %#x is outside the VMM's regions", self.socket_path.name, address
            )
            return
        if r.state[page] == _PRESENT:
            # Filled by prefetch or a neighbour's chunk after this fault was queued; the copy woke the
            # thread, unless the page came through an EEXIST path: wake it to be sure.
            uffd_abi.wake(self._uffd, r.base + page * r.page_size, r.page_size)
            return
        first = page - page % r.chunk_pages
        self._populate(r, first, min(first + r.chunk_pages, r.pages))

    def _prefetch(self) -> Iterator[int]:
        """Fill every missing page, one prefetch chunk per step; removed pages stay unfilled."""
        for r in self._regions:
            step = max(self.config.prefetch_chunk_size // r.page_size, 1)
            page = r.state.find(_MISSING)
            while page >= 0:
                first = page - page % step
                last = min(first + step, r.pages)
                self._prefetching = True
                try:
                    self._populate(r, first, last, missing_only=True)
                finally:
                    self._prefetching = False
                yield last
                page = r.state.find(_MISSING, last)

    # -- filling --------------------------------------------------------------------------------------

    def _populate(self, r: _Region, first: int, last: int, *, missing_only: bool = False) -> None:
        """Fill the pages of [first, last) that need it: missing ones from the source, removed ones with
        zeros (unless ``missing_only``)."""
        while True:
            try:
                for run in _TODO.finditer(r.state, first, last):
                    a, b = run.span()
                    if r.state[a] == _MISSING:
                        self._fill_from_source(r, a, b)
                    elif not missing_only:
                        self._fill_zeros(r, r.base + a * r.page_size, (b - a) * r.page_size)
                return
            except _Changing:
                self._counters.retries += 1
                self._drain()  # the events may turn some of the pages removed or gone: look again

    def _fill_from_source(self, r: _Region, a: int, b: int) -> None:
        ps = r.page_size
        extents = self._source.extents(r.offset + a * ps, (b - a) * ps)
        if ps > BLOCK_SIZE and any((e.offset | e.length) % ps for e in extents):
            self._fill_bounced(r, a, b, extents)
            return
        for e in extents:
            dst = r.base + (e.offset - r.offset)
            if e.address is None:
                self._fill_zeros(r, dst, e.length)
            else:
                self._fill(r, dst, e.length, e.address)

    def _fill_zeros(self, r: _Region, dst: int, length: int) -> None:
        if r.zeropage:
            try:
                self._fill(r, dst, length, None)
                return
            except _NoZeroPage:
                r.zeropage = False
        zeros = self._zero_buffer()
        for at in range(0, length, zeros.length):
            self._fill(r, dst + at, min(zeros.length, length - at), zeros.address)

    def _fill_bounced(self, r: _Region, a: int, b: int, extents: list[Extent]) -> None:
        """Huge pages whose contents span several extents: assemble each page, then copy it whole."""
        ps = r.page_size
        if self._bounce is None:
            self._bounce = uffd_abi.map_anonymous(ps)
        bounce = self._bounce.address
        for page in range(a, b):
            start, end = r.offset + page * ps, r.offset + (page + 1) * ps
            for e in extents:
                lo, hi = max(start, e.offset), min(end, e.offset + e.length)
                if lo < hi:
                    if e.address is None:
                        ctypes.memset(bounce + lo - start, 0, hi - lo)
                    else:
                        ctypes.memmove(bounce + lo - start, e.address + lo - e.offset, hi - lo)
            self._fill(r, r.base + page * ps, ps, bounce)

    def _zero_buffer(self) -> uffd_abi.Mapping:
        if self._zeros is None:
            size = max(
                self.config.chunk_size, self.config.prefetch_chunk_size, *(r.page_size for r in self._regions)
            )
            # Never written, so every page of it is the kernel's shared zero page: it costs no memory.
            self._zeros = uffd_abi.map_anonymous(size, writable=False)
        return self._zeros

    def _fill(self, r: _Region, dst: int, length: int, src: int | None) -> None:
        """UFFDIO_COPY from ``src`` (UFFDIO_ZEROPAGE when None) over [dst, dst+length); page states kept.

        A present page is skipped (and its waiters woken), a page whose mapping vanished is marked gone;
        a refusal while the address space changes raises _Changing after recording what was done.
        """
        ps, state, counters, uffd = r.page_size, r.state, self._counters, self._uffd
        start, end = dst, dst + length
        while dst < end:
            n = end - dst
            try:
                if src is None:
                    uffd_abi.zeropage(uffd, dst, n)
                else:
                    uffd_abi.copy(uffd, dst, src + (dst - start), n)
                done = n
            except uffd_abi.UffdError as exc:
                # The kernel reports progress as EAGAIN + bytes done; the real error comes on the next
                # call, which starts at the page that stopped it.
                done = exc.done
                if not done:
                    self._refused(exc.errno or 0, r, dst, src is None)
            pages = done // ps
            first = (dst - r.base) // ps
            state[first : first + pages] = b"\x01" * pages
            if src is None:
                counters.zeropage_calls += 1
                counters.zeroed_bytes += done
            else:
                counters.copy_calls += 1
                counters.copied_bytes += done
            if self._prefetching:
                counters.prefetch_bytes += done
            else:
                counters.fault_bytes += done
            dst += done
            if not done:  # _refused chose to skip the first page
                dst += ps

    def _refused(self, err: int, r: _Region, dst: int, zero: bool) -> None:
        """A fill that did nothing at ``dst``: mark the page and return to skip it, or raise."""
        page = (dst - r.base) // r.page_size
        if err == errno.EEXIST:  # already there (a racing fill, or memory the VMM populated)
            self._counters.exists += 1
            r.state[page] = _PRESENT
            uffd_abi.wake(self._uffd, dst, r.page_size)
        elif err == errno.ENOENT:  # the mapping is gone and the VMM did not tell (no UNMAP event)
            r.state[page] = _GONE
        elif err == errno.EAGAIN:
            raise _Changing
        elif err == errno.ESRCH:
            raise _PeerGone
        elif err == errno.EINVAL and zero:
            raise _NoZeroPage
        else:
            ioctl = "UFFDIO_ZEROPAGE" if zero else "UFFDIO_COPY"
            raise WrenboxError(f"{ioctl} at {dst:#x} failed: {os.strerror(err)}")
