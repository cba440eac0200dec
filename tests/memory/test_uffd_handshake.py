"""Firecracker's hand-off: what is accepted; garbled or hostile ones are refused cleanly, nothing leaked."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wrenbox.errors import InvalidArgument, Timeout
from wrenbox.memory.uffd import FileSource, GuestRegion, PageServer, PageServerConfig, ServerState
from wrenbox.memory.uffd import abi as uffd_abi
from wrenbox.memory.uffd.handshake import parse_regions

MiB = 1 << 20
SOURCE_SIZE = 16 * MiB
BASE = 0x7F00_0000_0000


def open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


def region(base: int = BASE, size: int = MiB, offset: int = 0, **extra: object) -> dict:
    return {"base_host_virt_addr": base, "size": size, "offset": offset, "page_size": 4096} | extra


def encode(document: object) -> bytes:
    return json.dumps(document).encode()


# -- the message itself ---------------------------------------------------------------------------------


def test_firecracker_message_with_both_page_size_keys():
    regions = parse_regions(
        encode(
            [
                region(BASE + 64 * MiB, 8 * MiB, 4 * MiB, page_size_kib=4096),
                region(BASE, 4 * MiB, 0, page_size_kib=4096),
            ]
        ),
        SOURCE_SIZE,
    )
    assert regions == (
        GuestRegion(BASE, 4 * MiB, 0, 4096),
        GuestRegion(BASE + 64 * MiB, 8 * MiB, 4 * MiB, 4096),
    )


def test_older_page_size_kib_carries_bytes():
    entry = {"base_host_virt_addr": BASE, "size": 4 * MiB, "offset": 0, "page_size_kib": 2 * MiB}
    assert parse_regions(encode([entry]), SOURCE_SIZE)[0].page_size == 2 * MiB


def test_page_size_wins_over_the_deprecated_key():
    entry = region(size=2 * MiB, page_size=2 * MiB, page_size_kib=4096)
    assert parse_regions(encode([entry]), SOURCE_SIZE)[0].page_size == 2 * MiB


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"[{", "not valid JSON"),
        (b"\xff\xfe[]", "not valid JSON"),
        (encode({"regions": []}), "non-empty JSON array"),
        (encode([]), "non-empty JSON array"),
        (encode([[BASE, MiB, 0, 4096]]), "expected a JSON object"),
        (encode([region(base=str(BASE))]), "'base_host_virt_addr' must be a non-negative integer"),
        (encode([region(size=1.5 * MiB)]), "'size' must be"),
        (encode([region(size=True)]), "'size' must be"),
        (encode([region(offset=-4096)]), "'offset' must be"),
        (encode([region(offset=None)]), "'offset' must be"),
        (encode([{"base_host_virt_addr": BASE, "size": MiB, "offset": 0}]), "no 'page_size'"),
        (encode([region(page_size=3000)]), "not a power of two"),
        (encode([region(page_size=2048)]), "not a power of two"),
        (encode([region(page_size=1 << 31)]), "not a power of two"),
        (encode([region(size=0)]), "non-zero multiples"),
        (encode([region(base=BASE + 512)]), "multiples of the page size"),
        (encode([region(size=MiB + 4096, page_size=2 * MiB)]), "multiples of the page size"),
        (encode([region(base=(1 << 64) - 4096, size=MiB)]), "not an address range"),
        (encode([region(offset=SOURCE_SIZE - 4096, size=2 * 4096)]), "past the end"),
        (encode([region(), region(base=BASE + MiB - 4096, offset=4 * MiB)]), "overlap in address"),
        (encode([region(), region(base=BASE + 8 * MiB, offset=MiB - 4096)]), "overlap in offset"),
    ],
)
def test_malformed_messages_are_refused(payload, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_regions(payload, SOURCE_SIZE)


# -- through a real socket ------------------------------------------------------------------------------

UNUSABLE = uffd_abi.unusable()
uffd_only = pytest.mark.skipif(bool(UNUSABLE), reason=f"needs userfaultfd: {UNUSABLE}")


@pytest.fixture
def memfile(tmp_path: Path) -> Path:
    path = tmp_path / "memfile"
    with open(path, "wb") as f:
        f.truncate(SOURCE_SIZE)
        f.write(os.urandom(MiB))
    return path


@pytest.fixture
def uffd() -> Iterator[int]:
    fd = uffd_abi.userfaultfd()
    uffd_abi.api(fd, uffd_abi.FEATURE_EVENT_REMOVE)
    yield fd
    os.close(fd)


@pytest.fixture
def serve(tmp_path: Path, memfile: Path) -> Iterator:
    """Start a server; after the test, check that stopping it leaves no descriptor and no thread behind."""
    baseline = open_fds()
    servers: list[PageServer] = []

    def start(**config: object) -> PageServer:
        config = {"prefetch": False, "handshake_timeout": 5.0} | config
        server = PageServer(tmp_path / "uffd.sock", FileSource(memfile), PageServerConfig(**config))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
        assert not server.socket_path.exists()
    assert open_fds() == baseline
    assert not [t for t in threading.enumerate() if t.name.startswith("uffd:")]


def hand_off(server: PageServer, payload: bytes, fds: list[int]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(server.socket_path))
        socket.send_fds(conn, [payload], fds)


def refused(server: PageServer, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        server.wait_ready(timeout=10)
    assert server.state is ServerState.FAILED
    assert server.regions == ()


@uffd_only
def test_a_valid_hand_off_is_taken(serve, uffd):
    server = serve()
    hand_off(server, encode([region(), region(BASE + 4 * MiB, 2 * MiB, 4 * MiB)]), [uffd])
    server.wait_ready(timeout=10)
    assert server.state is ServerState.SERVING
    assert server.regions == (
        GuestRegion(BASE, MiB, 0, 4096),
        GuestRegion(BASE + 4 * MiB, 2 * MiB, 4 * MiB, 4096),
    )
    assert server.peer_pid == os.getpid()


@uffd_only
def test_a_message_in_many_pieces_larger_than_one_read(serve, uffd):
    # 2000 regions of one page: ~200 KiB of JSON, sent in 4 KiB pieces with the fd on the first.
    regions = [region(BASE + 2 * i * 4096, 4096, i * 4096) for i in range(2000)]
    payload = encode(regions)
    assert len(payload) > 128 * 1024
    server = serve()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(server.socket_path))
        socket.send_fds(conn, [payload[:4096]], [uffd])
        for at in range(4096, len(payload), 4096):
            conn.sendall(payload[at : at + 4096])
            if at % (64 * 4096) == 0:
                time.sleep(0.01)
        server.wait_ready(timeout=10)  # complete without waiting for the connection to close
    assert len(server.regions) == 2000


@uffd_only
@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"this is not json", "not valid JSON"),
        (encode({"base_host_virt_addr": BASE}), "non-empty JSON array"),
        (encode([region(size="1 MiB")]), "'size' must be"),
        (encode([region(), region()]), "overlap"),
        (encode([region(offset=SOURCE_SIZE)]), "past the end"),
    ],
)
def test_garbled_hand_offs_fail_cleanly(serve, uffd, payload, message):
    server = serve()
    hand_off(server, payload, [uffd])
    refused(server, InvalidArgument, message)


@uffd_only
def test_no_descriptor(serve):
    server = serve()
    hand_off(server, encode([region()]), [])
    refused(server, InvalidArgument, "exactly one userfaultfd, it carried 0")


@uffd_only
def test_two_descriptors(serve, uffd):
    server = serve()
    other = uffd_abi.userfaultfd()
    try:
        hand_off(server, encode([region()]), [uffd, other])
    finally:
        os.close(other)
    refused(server, InvalidArgument, "it carried 2")


@uffd_only
def test_too_many_descriptors(serve, uffd):
    server = serve()
    hand_off(server, encode([region()]), [uffd] * 12)
    refused(server, InvalidArgument, "more than 8 descriptors")


@uffd_only
def test_a_descriptor_that_is_not_a_userfaultfd(serve):
    server = serve()
    r, w = os.pipe()
    try:
        hand_off(server, encode([region()]), [r])
    finally:
        os.close(r)
        os.close(w)
    refused(server, InvalidArgument, "not a userfaultfd")


@uffd_only
def test_a_huge_message(serve, uffd):
    server = serve(max_handshake_bytes=64 * 1024)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(server.socket_path))
        socket.send_fds(conn, [b"[" + b" " * 4096], [uffd])
        with pytest.raises((BrokenPipeError, ConnectionResetError)):  # the server hangs up on us
            for _ in range(1024):
                conn.sendall(b" " * 4096)
    refused(server, InvalidArgument, "larger than 65536 bytes")


@uffd_only
def test_connect_then_close(serve):
    server = serve()
    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(str(server.socket_path))  # closed at once
    refused(server, InvalidArgument, "closed the connection without sending")


@uffd_only
def test_an_unfinished_message_times_out(serve, uffd):
    server = serve(handshake_timeout=0.3)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(server.socket_path))
        socket.send_fds(conn, [encode([region()])[:-1]], [uffd])
        refused(server, Timeout, "no complete handshake")


@uffd_only
def test_stop_in_the_middle_of_a_hand_off(serve, uffd):
    server = serve(handshake_timeout=60)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(server.socket_path))
        socket.send_fds(conn, [b"[{"], [uffd])
        time.sleep(0.05)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1
    assert server.state is ServerState.STOPPED
    assert server.error is None


@uffd_only
def test_only_one_vmm_is_accepted(serve, uffd):
    server = serve()
    hand_off(server, encode([region()]), [uffd])
    server.wait_ready(timeout=10)
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as second,
        pytest.raises(ConnectionRefusedError),
    ):
        second.connect(str(server.socket_path))
