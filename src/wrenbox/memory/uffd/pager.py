"""The engine of the page server: answers one userfaultfd's faults and events from a :class:`PageSource`.

:class:`Pager` runs on one thread (the page server's), one event at a time:

* a page fault is answered for its whole aligned *chunk* (clamped to the region), since one large
  ``UFFDIO_COPY`` costs about what one 4 KiB copy costs in Python overhead; data comes straight from the
  source's mapping, holes get ``UFFDIO_ZEROPAGE`` (hugetlbfs has none: copied from a zero mapping); a huge
  page whose contents span several source extents is assembled in a bounce page and copied whole;
* ``UFFD_EVENT_REMOVE`` (balloon, ``madvise(MADV_DONTNEED)``) marks the range removed: it reads as zeros
  from then on and is never filled with snapshot content again; ``UFFD_EVENT_UNMAP`` marks it gone;
* a copy that meets a present page (``EEXIST``) skips it and wakes its waiters; a copy refused while the
  address space changes (``EAGAIN``) reads the pending events first, then looks again at what is needed;
* a fault on a page already filled is a duplicate (woken), or the page was dropped by a VMM that did not
  ask for remove events: then it gets zeros, as dropped anonymous memory reads;
* with nothing to answer, it prefetches the rest of memory one step at a time, looking at the uffd between
  two steps, so faults always go first and there is no second thread to race with.

Other events a VMM may have negotiated are survived (a forked uffd is closed). The state of each page is
one byte: missing, present, removed or gone.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields

from wrenbox.errors import WrenboxError
from wrenbox.memory.uffd import abi
from wrenbox.memory.uffd.handshake import GuestRegion
from wrenbox.memory.uffd.source import BLOCK_SIZE, Extent, PageSource

__all__ = ["PageServerStats", "Pager", "PeerGone"]

log = logging.getLogger(__name__)

_BATCH = 64  # messages per read: one syscall takes what many vCPUs queued
_MISSING, _PRESENT, _REMOVED, _GONE = 0, 1, 2, 3
_TODO = re.compile(b"\x00+|\x02+")  # runs of pages to fill: missing (from the source) or removed (zeros)


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
    """Fills that found a page already present (EEXIST): duplicate faults, racing fills."""
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


class PeerGone(Exception):
    """The VMM's address space no longer exists (it exited): nothing is left to serve."""


class _Changing(Exception):
    """The kernel refused a fill while the address space changes; read the pending events first."""


class _NoZeroPage(Exception):
    """UFFDIO_ZEROPAGE is not supported on this memory (hugetlbfs): copy zeros instead."""


class Pager:
    """Serves one userfaultfd. Owns its scratch mappings (:meth:`close`), not the uffd nor the source."""

    def __init__(
        self,
        uffd: int,
        regions: Sequence[GuestRegion],
        source: PageSource,
        wait: Callable[[int, float | None], bool],
        *,
        chunk_size: int,
        prefetch_chunk_size: int,
        name: str = "uffd",
    ) -> None:
        self._uffd = uffd
        self._regions = [_Region(r, chunk_size) for r in sorted(regions, key=lambda r: r.base)]
        self._bases = [r.base for r in self._regions]
        self._source = source
        self._chunk_size = chunk_size
        self._prefetch_chunk_size = prefetch_chunk_size
        self._name = name
        self._counters = _Counters()
        self._deferred: list[int] = []
        self._prefetching = False
        self._zeros: abi.Mapping | None = None
        self._bounce: abi.Mapping | None = None
        self._wait = wait

    @property
    def stats(self) -> PageServerStats:
        return self._counters.snapshot()

    def close(self) -> None:
        for mapping in (self._zeros, self._bounce):
            if mapping is not None:
                mapping.close()
        self._zeros = self._bounce = None

    def serve(self, stop: threading.Event, *, prefetch: bool) -> None:
        """Answer faults and events (and prefetch when idle) until ``stop`` is set.

        ``wait(fd, timeout)`` (given at construction) blocks until ``fd`` is readable (True) or the timeout
        passes (False); it is how the owner interrupts an idle pager: it raises when asked to stop.
        Raises PeerGone when the VMM's memory is gone, WrenboxError when serving cannot go on correctly.
        """
        steps = self._prefetch() if prefetch else None
        while not stop.is_set():
            try:
                batch = os.read(self._uffd, abi.MSG_SIZE * _BATCH)
            except BlockingIOError:
                batch = b""
            if batch:
                self._dispatch(batch)
            elif steps is not None:
                if next(steps, None) is None:
                    steps = None
                    self._counters.prefetch_done = True
            else:
                self._wait(self._uffd, None)
            while self._deferred:  # faults read while a fill waited for pending events
                self._fault(self._deferred.pop())

    # -- events ---------------------------------------------------------------------------------------

    def _dispatch(self, batch: bytes, *, defer_faults: bool = False) -> None:
        counters = self._counters
        for at in range(0, len(batch), abi.MSG_SIZE):
            event, arg0, arg1, _ = abi.MSG.unpack_from(batch, at)
            if event == abi.EVENT_PAGEFAULT:  # arg0: flags, arg1: address
                counters.faults += 1
                if defer_faults:
                    self._deferred.append(arg1)
                else:
                    self._fault(arg1)
            elif event == abi.EVENT_REMOVE:  # [arg0, arg1)
                counters.removes += 1
                self._mark(arg0, arg1, _REMOVED)
            elif event == abi.EVENT_UNMAP:
                counters.unmaps += 1
                self._mark(arg0, arg1, _GONE)
            else:
                counters.other_events += 1
                if event == abi.EVENT_FORK:  # the child's new uffd landed in our fd table
                    os.close(arg0 & 0xFFFFFFFF)
                log.warning("page server %s: ignoring uffd event %#x", self._name, event)

    def _drain(self) -> None:
        """Read events that are pending (or about to be) while we are in the middle of a fill."""
        self._wait(self._uffd, 0.01)
        try:
            batch = os.read(self._uffd, abi.MSG_SIZE * _BATCH)
        except BlockingIOError:
            return
        self._dispatch(batch, defer_faults=True)

    def _region_at(self, address: int) -> _Region | None:
        i = bisect.bisect_right(self._bases, address) - 1
        if i < 0 or address >= self._regions[i].end:
            return None
        return self._regions[i]

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
            log.error("page server %s: fault at %#x is outside the VMM's regions", self._name, address)
            return
        if r.state[page] == _PRESENT:
            # Usually a duplicate: another thread faulted on the same chunk, or prefetch filled it after
            # the message was queued; the zero fill then meets the page (EEXIST) and just wakes the
            # thread. But a VMM that did not ask for EVENT_REMOVE drops pages silently (MADV_DONTNEED),
            # and then this re-fault is the only sign: the page reads as zeros, as dropped memory does.
            self._fill_zeros(r, r.base + page * r.page_size, r.page_size)
            return
        first = page - page % r.chunk_pages
        self._populate(r, first, min(first + r.chunk_pages, r.pages))

    def _prefetch(self) -> Iterator[int]:
        """Fill every missing page, one prefetch chunk per step; removed pages stay unfilled."""
        for r in self._regions:
            step = max(self._prefetch_chunk_size // r.page_size, 1)
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
            self._bounce = abi.map_anonymous(ps)
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

    def _zero_buffer(self) -> abi.Mapping:
        if self._zeros is None:
            size = max(self._chunk_size, self._prefetch_chunk_size, *(r.page_size for r in self._regions))
            # Never written, so every page of it is the kernel's shared zero page: it costs no memory.
            self._zeros = abi.map_anonymous(size, writable=False)
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
                    abi.zeropage(uffd, dst, n)
                else:
                    abi.copy(uffd, dst, src + (dst - start), n)
                done = n
            except abi.UffdError as exc:
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
            abi.wake(self._uffd, dst, r.page_size)
        elif err == errno.ENOENT:  # the mapping is gone and the VMM did not tell (no UNMAP event)
            r.state[page] = _GONE
        elif err == errno.EAGAIN:
            raise _Changing
        elif err == errno.ESRCH:
            raise PeerGone
        elif err == errno.EINVAL and zero:
            raise _NoZeroPage
        else:
            ioctl = "UFFDIO_ZEROPAGE" if zero else "UFFDIO_COPY"
            raise WrenboxError(f"{ioctl} at {dst:#x} failed: {os.strerror(err)}")
