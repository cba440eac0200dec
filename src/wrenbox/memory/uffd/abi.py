"""The userfaultfd kernel ABI, from Python: ioctl numbers, struct layouts and thin call wrappers.

Everything here mirrors ``include/uapi/linux/userfaultfd.h`` (x86_64, generic ``_IOC`` encoding). The ioctl
numbers are computed from the struct sizes rather than typed in, so a wrong layout shows up as a wrong
number (``tests/memory/test_uffd_abi.py`` pins them to the values the C header yields).

Both sides of the Firecracker hand-off use this module: the page server (:mod:`wrenbox.memory.uffd`) needs
:func:`copy`, :func:`zeropage`, :func:`wake` and the event layouts; whoever plays the VMM (the tests, the
benchmark) needs :func:`userfaultfd`, :func:`api` and :func:`register`. Failing ioctls raise
:class:`UffdError`, which carries how many bytes the kernel managed before it stopped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import struct
from pathlib import Path

__all__ = [
    "API",
    "COPY",
    "EVENT_FORK",
    "EVENT_PAGEFAULT",
    "EVENT_REMAP",
    "EVENT_REMOVE",
    "EVENT_UNMAP",
    "FEATURE_EVENT_FORK",
    "FEATURE_EVENT_REMOVE",
    "FEATURE_EVENT_UNMAP",
    "MSG",
    "MSG_SIZE",
    "REGISTER",
    "REGISTER_MODE_MISSING",
    "WAKE",
    "ZEROPAGE",
    "Mapping",
    "UffdError",
    "api",
    "copy",
    "is_userfaultfd",
    "map_anonymous",
    "map_file",
    "register",
    "unusable",
    "userfaultfd",
    "wake",
    "zeropage",
]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

# Struct layouts (little-endian, natural alignment; uffd_msg is __packed and always 32 bytes).
_API = struct.Struct("<QQQ")  # uffdio_api {api, features, ioctls(out)}
_RANGE = struct.Struct("<QQ")  # uffdio_range {start, len}
_REGISTER = struct.Struct("<QQQQ")  # uffdio_register {range, mode, ioctls(out)}
_COPY = struct.Struct("<QQQQq")  # uffdio_copy {dst, src, len, mode, copy(out)}
_ZEROPAGE = struct.Struct("<QQQq")  # uffdio_zeropage {range, mode, zeropage(out)}
MSG = struct.Struct("<B7xQQQ")
"""``uffd_msg``: event @0, then three u64 argument words @8, @16, @24 (meaning depends on the event)."""
MSG_SIZE = MSG.size

# asm-generic/ioctl.h: dir<<30 | size<<16 | type<<8 | nr
_IOC_WRITE, _IOC_READ = 1, 2
_UFFDIO = 0xAA


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | _UFFDIO << 8 | nr


API = _ioc(_IOC_READ | _IOC_WRITE, 0x3F, _API.size)
REGISTER = _ioc(_IOC_READ | _IOC_WRITE, 0x00, _REGISTER.size)
WAKE = _ioc(_IOC_READ, 0x02, _RANGE.size)
COPY = _ioc(_IOC_READ | _IOC_WRITE, 0x03, _COPY.size)
ZEROPAGE = _ioc(_IOC_READ | _IOC_WRITE, 0x04, _ZEROPAGE.size)

UFFD_API = 0xAA
EVENT_PAGEFAULT, EVENT_FORK, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP = 0x12, 0x13, 0x14, 0x15, 0x16
FEATURE_EVENT_FORK = 1 << 1
FEATURE_EVENT_REMOVE = 1 << 3
FEATURE_EVENT_UNMAP = 1 << 6
REGISTER_MODE_MISSING = 1

_SYS_USERFAULTFD = 323  # x86_64
_PROT_READ, _PROT_WRITE = 0x1, 0x2
_MAP_SHARED, _MAP_PRIVATE, _MAP_ANONYMOUS = 0x01, 0x02, 0x20
_MAP_NORESERVE, _MAP_POPULATE, _MAP_HUGETLB = 0x4000, 0x8000, 0x40000
_MAP_FAILED = ctypes.c_void_p(-1).value


class UffdError(OSError):
    """A userfaultfd ioctl failed; ``done`` is how many bytes it completed first (0 if none)."""

    def __init__(self, errno: int, done: int) -> None:
        super().__init__(errno, os.strerror(errno))
        self.done = max(done, 0)


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def userfaultfd(flags: int = os.O_CLOEXEC | os.O_NONBLOCK) -> int:
    """Create a userfaultfd (the syscall Firecracker makes); PermissionError without the privilege."""
    fd = _libc.syscall(_SYS_USERFAULTFD, flags)
    if fd < 0:
        _raise_errno("userfaultfd")
    return int(fd)


def api(fd: int, features: int = 0) -> tuple[int, int]:
    """UFFDIO_API handshake (once per fd): ask for ``features``; return (features granted, ioctl mask)."""
    buf = bytearray(_API.pack(UFFD_API, features, 0))
    fcntl.ioctl(fd, API, buf)
    _, granted, ioctls = _API.unpack(buf)
    return granted, ioctls


def unusable() -> str | None:
    """Why this process cannot use userfaultfd as a VMM does (kernel-mode faults included), or None."""
    try:
        fd = userfaultfd()
    except OSError as exc:
        return f"userfaultfd() failed: {exc.strerror} (needs root or vm.unprivileged_userfaultfd=1)"
    try:
        api(fd)
    except OSError as exc:
        return f"UFFDIO_API failed: {exc.strerror}"
    finally:
        os.close(fd)
    return None


def register(fd: int, start: int, length: int, mode: int = REGISTER_MODE_MISSING) -> int:
    """UFFDIO_REGISTER a range; return the mask of ioctls usable on it."""
    buf = bytearray(_REGISTER.pack(start, length, mode, 0))
    fcntl.ioctl(fd, REGISTER, buf)
    return _REGISTER.unpack(buf)[3]


def copy(fd: int, dst: int, src: int, length: int) -> None:
    """UFFDIO_COPY ``length`` bytes from ``src`` to the registered ``dst`` and wake waiters on that range.

    UffdError(EEXIST) when the first page is already present; UffdError(EAGAIN) with ``done`` > 0 when it
    stopped early (a present page further on), with ``done`` == 0 while the address space is changing.
    """
    buf = bytearray(_COPY.pack(dst, src, length, 0, 0))
    try:
        fcntl.ioctl(fd, COPY, buf)
    except OSError as exc:
        # fcntl.ioctl copies a small buffer back before it raises, so the out field is valid here.
        raise UffdError(exc.errno or 0, _COPY.unpack(buf)[4]) from None


def zeropage(fd: int, start: int, length: int) -> None:
    """UFFDIO_ZEROPAGE: map the zero page over a range (anonymous/shmem only; EINVAL on hugetlbfs)."""
    buf = bytearray(_ZEROPAGE.pack(start, length, 0, 0))
    try:
        fcntl.ioctl(fd, ZEROPAGE, buf)
    except OSError as exc:
        raise UffdError(exc.errno or 0, _ZEROPAGE.unpack(buf)[3]) from None


def wake(fd: int, start: int, length: int) -> None:
    """UFFDIO_WAKE: let threads waiting on faults in a range retry."""
    fcntl.ioctl(fd, WAKE, _RANGE.pack(start, length))


def is_userfaultfd(fd: int) -> bool:
    try:
        return str(Path(f"/proc/self/fd/{fd}").readlink()) == "anon_inode:[userfaultfd]"
    except OSError:
        return False


class Mapping:
    """A region of this process's address space from ``mmap``, with a stable address; unmapped on close.

    Python's :mod:`mmap` objects hide their address and refuse to hand out read-only memory through
    ctypes, and UFFDIO_COPY needs raw addresses, so this calls libc directly.
    """

    def __init__(self, address: int, length: int) -> None:
        self.address = address
        self.length = length

    def close(self) -> None:
        if self.length:
            _libc.munmap(self.address, self.length)
            self.length = 0

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mmap(length: int, prot: int, flags: int, fd: int) -> Mapping:
    address = _libc.mmap(None, length, prot, flags, fd, 0)
    if address is None or address == _MAP_FAILED:
        _raise_errno("mmap")
    return Mapping(address, length)


def map_file(fd: int, length: int, *, populate: bool = False) -> Mapping:
    """Map a file read-only and shared, so reads come straight from the page cache."""
    return _mmap(length, _PROT_READ, _MAP_SHARED | (_MAP_POPULATE if populate else 0), fd)


def map_anonymous(
    length: int, *, writable: bool = True, huge: bool = False, populate: bool = False
) -> Mapping:
    """Private anonymous memory, as a VMM allocates guest RAM (MAP_NORESERVE, optionally MAP_HUGETLB)."""
    prot = _PROT_READ | (_PROT_WRITE if writable else 0)
    flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE
    flags |= (_MAP_HUGETLB if huge else 0) | (_MAP_POPULATE if populate else 0)
    return _mmap(length, prot, flags, -1)
