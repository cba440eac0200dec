"""The userfaultfd ABI wrappers against the real kernel, in this process."""

from __future__ import annotations

import ctypes
import errno
import os
import threading

import pytest

from wrenbox.memory.uffd import abi as uffd_abi

PAGE = 4096


UNUSABLE = uffd_abi.unusable()
needs_uffd = pytest.mark.skipif(bool(UNUSABLE), reason=f"needs userfaultfd: {UNUSABLE}")


def test_ioctl_numbers_match_the_kernel_header():
    # The values <linux/userfaultfd.h> yields on x86_64 (checked with a C compiler when this was written).
    assert uffd_abi.API == 0xC018AA3F
    assert uffd_abi.REGISTER == 0xC020AA00
    assert uffd_abi.WAKE == 0x8010AA02
    assert uffd_abi.COPY == 0xC028AA03
    assert uffd_abi.ZEROPAGE == 0xC020AA04
    assert uffd_abi.MSG_SIZE == 32


@pytest.fixture
def uffd() -> int:
    fd = uffd_abi.userfaultfd()
    yield fd
    os.close(fd)


@needs_uffd
def test_copy_zeropage_wake_and_their_errors(uffd):
    granted, _ = uffd_abi.api(uffd, uffd_abi.FEATURE_EVENT_REMOVE)
    assert granted & uffd_abi.FEATURE_EVENT_REMOVE
    pattern = os.urandom(4 * PAGE)
    with uffd_abi.map_anonymous(4 * PAGE) as memory, uffd_abi.map_anonymous(4 * PAGE) as source:
        usable = uffd_abi.register(uffd, memory.address, memory.length)
        assert usable & (1 << 3)  # _UFFDIO_COPY
        assert usable & (1 << 4)  # _UFFDIO_ZEROPAGE
        ctypes.memmove(source.address, pattern, len(pattern))

        uffd_abi.copy(uffd, memory.address, source.address, PAGE)
        assert ctypes.string_at(memory.address, PAGE) == pattern[:PAGE]
        with pytest.raises(uffd_abi.UffdError) as exists:
            uffd_abi.copy(uffd, memory.address, source.address, PAGE)
        assert (exists.value.errno, exists.value.done) == (errno.EEXIST, 0)

        # Page 2 present: a copy of pages 1-2 stops after page 1 and says how far it got.
        uffd_abi.copy(uffd, memory.address + 2 * PAGE, source.address + 2 * PAGE, PAGE)
        with pytest.raises(uffd_abi.UffdError) as partial:
            uffd_abi.copy(uffd, memory.address + PAGE, source.address + PAGE, 2 * PAGE)
        assert (partial.value.errno, partial.value.done) == (errno.EAGAIN, PAGE)
        assert ctypes.string_at(memory.address, 3 * PAGE) == pattern[: 3 * PAGE]

        uffd_abi.zeropage(uffd, memory.address + 3 * PAGE, PAGE)
        assert ctypes.string_at(memory.address + 3 * PAGE, PAGE) == bytes(PAGE)
        with pytest.raises(uffd_abi.UffdError) as zero_exists:
            uffd_abi.zeropage(uffd, memory.address, PAGE)
        assert zero_exists.value.errno == errno.EEXIST
        uffd_abi.wake(uffd, memory.address, memory.length)


@needs_uffd
def test_a_fault_message_names_the_address_and_a_copy_wakes_the_thread(uffd):
    uffd_abi.api(uffd)
    data = os.urandom(PAGE)
    with uffd_abi.map_anonymous(4 * PAGE) as memory, uffd_abi.map_anonymous(PAGE) as source:
        uffd_abi.register(uffd, memory.address, memory.length)
        ctypes.memmove(source.address, data, PAGE)
        seen = ctypes.create_string_buffer(8)
        # libc's memcpy through ctypes.CDLL drops the GIL while the read waits on its fault (string_at
        # would keep it, and this thread could never answer the fault).
        memcpy = ctypes.CDLL(None).memcpy
        memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        reader = threading.Thread(target=memcpy, args=(seen, memory.address + 2 * PAGE + 8, 8))
        reader.start()
        os.set_blocking(uffd, True)
        message = os.read(uffd, uffd_abi.MSG_SIZE)
        event, flags, address, _ = uffd_abi.MSG.unpack(message)
        assert event == uffd_abi.EVENT_PAGEFAULT
        assert flags & 1 == 0  # a read fault
        assert address & ~(PAGE - 1) == memory.address + 2 * PAGE
        uffd_abi.copy(uffd, memory.address + 2 * PAGE, source.address, PAGE)
        reader.join(10)
        assert not reader.is_alive()
        assert seen.raw == data[8:16]


@needs_uffd
def test_is_userfaultfd(uffd):
    assert uffd_abi.is_userfaultfd(uffd)
    r, w = os.pipe()
    try:
        assert not uffd_abi.is_userfaultfd(r)
    finally:
        os.close(r)
        os.close(w)
    assert not uffd_abi.is_userfaultfd(10_000)
