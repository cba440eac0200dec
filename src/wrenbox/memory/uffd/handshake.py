"""Firecracker's hand-off of guest memory to a page server: receive it, check it, describe the regions.

During ``PUT /snapshot/load`` with a ``Uffd`` memory backend, Firecracker creates a userfaultfd, registers
its guest memory with it (missing-page mode), connects to the page server's Unix stream socket and sends
ONE message: a JSON array with one object per guest memory region ::

    [{"base_host_virt_addr": 140303360671744, "size": 536870912, "offset": 0,
      "page_size": 4096, "page_size_kib": 4096}]

with the userfaultfd attached as ``SCM_RIGHTS``. ``offset`` is where the region starts in the snapshot's
memory file. ``page_size`` is in bytes; older Firecracker sends only ``page_size_kib``, which despite its
name also carries bytes. A stream socket may deliver the message in several pieces, so the receiver reads
until the bytes form one complete JSON document.

Everything here is strict: a message that is not exactly that (bad JSON, wrong types, misaligned or
overlapping regions, regions past the end of the memory, no descriptor, several descriptors, a
descriptor that is not a userfaultfd, too many bytes) is refused with
:class:`~wrenbox.errors.InvalidArgument` and every descriptor that came with it is closed.
"""

from __future__ import annotations

import array
import itertools
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from wrenbox.errors import InvalidArgument, Timeout
from wrenbox.memory.uffd import abi
from wrenbox.memory.uffd.source import BLOCK_SIZE

__all__ = ["GuestRegion", "parse_regions", "receive_handshake"]

_READ_SIZE = 64 * 1024
_MAX_FDS = 8  # room to see (and close) what a broken peer sends beyond the one descriptor we want
_MAX_PAGE_SIZE = 1 << 30
_ADDRESS_LIMIT = 1 << 64


@dataclass(frozen=True, slots=True)
class GuestRegion:
    """One region of guest memory as the VMM mapped it."""

    base: int
    """Start of the region in the VMM's address space (``base_host_virt_addr``)."""
    size: int
    offset: int
    """Start of the region in the logical memory (the snapshot's memory file)."""
    page_size: int

    @property
    def end(self) -> int:
        return self.base + self.size


def _field(index: int, entry: dict[str, object], name: str) -> int:
    value = entry.get(name)
    if type(value) is not int or value < 0:  # bool is an int subclass; it is not a size
        raise InvalidArgument(f"region {index}: {name!r} must be a non-negative integer, got {value!r}")
    return value


def _region(index: int, entry: object, source_size: int) -> GuestRegion:
    if not isinstance(entry, dict):
        raise InvalidArgument(f"region {index}: expected a JSON object, got {type(entry).__name__}")
    # Prefer page_size; page_size_kib is the deprecated name of the same value (bytes, despite the name).
    page_key = "page_size" if "page_size" in entry else "page_size_kib"
    if page_key not in entry:
        raise InvalidArgument(f"region {index}: no 'page_size' (or older 'page_size_kib')")
    region = GuestRegion(
        base=_field(index, entry, "base_host_virt_addr"),
        size=_field(index, entry, "size"),
        offset=_field(index, entry, "offset"),
        page_size=_field(index, entry, page_key),
    )
    ps = region.page_size
    if ps < BLOCK_SIZE or ps > _MAX_PAGE_SIZE or ps & (ps - 1):
        raise InvalidArgument(f"region {index}: page size {ps} is not a power of two from 4 KiB to 1 GiB")
    if region.size == 0 or (region.base | region.size | region.offset) % ps:
        raise InvalidArgument(
            f"region {index}: base {region.base:#x}, size {region.size} and offset {region.offset} "
            f"must be non-zero multiples of the page size {ps}"
        )
    if region.end > _ADDRESS_LIMIT:
        raise InvalidArgument(f"region {index}: [{region.base:#x}, {region.end:#x}) is not an address range")
    if region.offset + region.size > source_size:
        raise InvalidArgument(
            f"region {index}: offset {region.offset} + size {region.size} is past the end of the "
            f"snapshot memory ({source_size} bytes)"
        )
    return region


def _check_disjoint(regions: list[GuestRegion], start: str) -> None:
    def key(r: GuestRegion) -> int:
        return r.base if start == "address" else r.offset

    ordered = sorted(regions, key=key)
    for before, after in itertools.pairwise(ordered):
        if key(before) + before.size > key(after):
            raise InvalidArgument(
                f"regions overlap in {start}: {key(before):#x}+{before.size} and {key(after):#x}"
            )


def parse_regions(payload: bytes, source_size: int) -> tuple[GuestRegion, ...]:
    """The regions of a handshake message, sorted by address; InvalidArgument if the message is wrong."""
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"handshake is not valid JSON: {exc}") from None
    if not isinstance(document, list) or not document:
        raise InvalidArgument("handshake must be a non-empty JSON array of memory regions")
    regions = [_region(i, entry, source_size) for i, entry in enumerate(document)]
    _check_disjoint(regions, "address")
    _check_disjoint(regions, "offset")
    return tuple(sorted(regions, key=lambda r: r.base))


def _complete(data: bytearray) -> bool:
    """True once ``data`` holds a whole JSON document (cheap test first: it must end with ']' or '}')."""
    text = data.rstrip()
    if not text or text[-1:] not in (b"]", b"}"):
        return False
    try:
        json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def _take_fds(ancillary: list[tuple[int, int, bytes]], into: list[int]) -> None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            into.extend(fds)


def _receive(
    conn: socket.socket, deadline: float, max_bytes: int, wait: Callable[[int, float], bool], fds: list[int]
) -> bytes:
    data = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not wait(conn.fileno(), remaining):
            raise Timeout(f"the VMM sent no complete handshake within the time allowed ({len(data)} bytes)")
        try:
            chunk, ancillary, flags, _ = conn.recvmsg(
                _READ_SIZE, socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            continue
        _take_fds(ancillary, fds)
        if flags & socket.MSG_CTRUNC:
            raise InvalidArgument(f"handshake carried more than {_MAX_FDS} descriptors")
        if not chunk:
            if not data:
                raise InvalidArgument("the VMM closed the connection without sending its memory regions")
            return bytes(data)  # whatever arrived; parse_regions reports what is wrong with it
        data += chunk
        if len(data) > max_bytes:
            raise InvalidArgument(f"handshake message is larger than {max_bytes} bytes")
        if _complete(data):
            return bytes(data)


def receive_handshake(
    conn: socket.socket, *, timeout: float, max_bytes: int, wait: Callable[[int, float], bool]
) -> tuple[bytes, int]:
    """Read Firecracker's one message from ``conn``: (JSON payload, userfaultfd).

    ``wait(fd, timeout)`` blocks until ``fd`` is readable (True) or the timeout passes (False); whatever
    it raises (a stop request) propagates. Raises InvalidArgument for a malformed message and Timeout when
    it is not complete in ``timeout`` seconds. Only on success does the caller own the fd.
    """
    fds: list[int] = []
    try:
        payload = _receive(conn, time.monotonic() + timeout, max_bytes, wait, fds)
        if len(fds) != 1:
            raise InvalidArgument(f"handshake must carry exactly one userfaultfd, it carried {len(fds)}")
        if not abi.is_userfaultfd(fds[0]):
            raise InvalidArgument("the descriptor sent with the handshake is not a userfaultfd")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return payload, fds[0]
