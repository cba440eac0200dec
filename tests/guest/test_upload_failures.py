"""An upload that fails changes nothing (a real ``python -m wrenbox.guest``, as root).

The body is held aside until all of it has arrived: a stalled body, a client that hangs up, a bad or
cut-off gzip stream, a multipart body without its closing boundary leave every target byte for byte as
it was and create no file or directory. A full disk is found before the target changes (507). And a
completed upload still shows watchers only the events a plain write would.
"""

from __future__ import annotations

import gzip
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.support.mounts import tmpfs

from .conftest import RunningAgent, start_agent

pytestmark = pytest.mark.root

BODY_TIMEOUT = 1.0
OLD = b"the old content, which no failed upload may touch\n" * 100


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    log = tmp_path_factory.mktemp("agent") / "agent.log"
    running = start_agent("127.0.0.1:0", log, "--log-level", "debug", "--body-timeout", str(BODY_TIMEOUT))
    yield running
    running.stop()
    assert "Traceback" not in running.log(), running.log()[-4000:]


@pytest.fixture
def box(tmp_path: Path) -> Path:
    """A directory holding ``kept`` (OLD): the target every failed upload aims at."""
    (tmp_path / "kept").write_bytes(OLD)
    return tmp_path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its content (None for a directory)."""
    found: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[str(Path(dirpath, name))] = None
        for name in filenames:
            found[str(Path(dirpath, name))] = Path(dirpath, name).read_bytes()
    return found


def raw_request(
    agent: RunningAgent, target: Path, body_head: bytes, length: int, extra: str = ""
) -> socket.socket:
    """An octet-stream upload of ``length`` bytes of which only ``body_head`` is sent."""
    sock = socket.create_connection(("127.0.0.1", agent.port), timeout=30)
    head = (
        f"POST /files?path={target} HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\n"
        f"{extra}content-length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + body_head)
    return sock


def answer_of(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def wait_for_log(agent: RunningAgent, text: str, count: int) -> None:
    """Until the agent's log holds ``text`` ``count`` times: the request it names has finished."""
    deadline = time.monotonic() + 30
    while agent.log().count(text) < count:
        assert time.monotonic() < deadline, agent.log()[-2000:]
        time.sleep(0.05)


def test_a_stalled_upload_changes_nothing(agent: RunningAgent, box: Path) -> None:
    before = snapshot(box)
    for target in (box / "kept", box / "new-dir" / "deeper" / "new"):
        with raw_request(agent, target, b"new", 1000) as sock:
            assert answer_of(sock).startswith(b"HTTP/1.1 408")
    assert snapshot(box) == before


def test_a_client_hanging_up_mid_body_changes_nothing(agent: RunningAgent, box: Path) -> None:
    before = snapshot(box)
    left = agent.log().count("the client left before its request was complete")
    for target in (box / "kept", box / "new-dir" / "new"):
        with raw_request(agent, target, b"x" * 300_000, 1_000_000):
            pass
    wait_for_log(agent, "the client left before its request was complete", left + 2)
    assert snapshot(box) == before


@pytest.mark.parametrize(
    "body",
    [
        gzip.compress(b"new content " * 10_000)[:-2000],  # cut off: inflates without an error
        gzip.compress(b"new content " * 10_000)[:200] + b"\xff" * 64,  # corrupt midway
        b"not gzip at all",
    ],
    ids=["cut-off", "corrupt", "not-gzip"],
)
def test_a_bad_gzip_body_changes_nothing(agent: RunningAgent, box: Path, body: bytes) -> None:
    before = snapshot(box)
    for target in (box / "kept", box / "new-dir" / "new"):
        answer = httpx.post(
            agent.url + "/files",
            params={"path": str(target)},
            content=body,
            headers={"content-type": "application/octet-stream", "content-encoding": "gzip"},
        )
        assert answer.status_code == 400, answer.text
        assert "gzip" in answer.json()["message"]
    assert snapshot(box) == before


def test_a_multipart_body_without_its_closing_boundary_changes_nothing(
    agent: RunningAgent, box: Path
) -> None:
    (box / "second").write_bytes(OLD[::-1])
    before = snapshot(box)
    part = 'Content-Disposition: form-data; name="file"; filename="{}"\r\n\r\n'
    body = b"".join(
        [
            b"--xyz\r\n" + part.format(box / "kept").encode() + b"first part, complete\r\n",
            b"--xyz\r\n" + part.format(box / "new-dir" / "new").encode() + b"a new file, complete\r\n",
            b"--xyz\r\n" + part.format(box / "second").encode() + b"the last part, cut off",
        ]
    )
    answer = httpx.post(
        agent.url + "/files", content=body, headers={"content-type": "multipart/form-data; boundary=xyz"}
    )
    assert answer.status_code == 400, answer.text
    assert "closing boundary" in answer.json()["message"]
    assert snapshot(box) == before
    # The same parts with their closing boundary do land (the body above failed only by its end).
    answer = httpx.post(
        agent.url + "/files",
        content=body + b"\r\n--xyz--\r\n",
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert answer.status_code == 200, answer.text
    assert (box / "kept").read_bytes() == b"first part, complete"
    assert (box / "new-dir" / "new").read_bytes() == b"a new file, complete"
    assert (box / "second").read_bytes() == b"the last part, cut off"


# -- a full disk --------------------------------------------------------------------------------------

KIB = 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, mounted for this test alone."""
    with tmpfs(tmp_path / "small", "size=1m,mode=0755") as mount:
        yield mount


def fill_to(mount: Path, free: int) -> None:
    """Take room with a filler file until exactly ``free`` bytes are left."""
    vfs = os.statvfs(mount)
    available = vfs.f_bavail * vfs.f_frsize
    (mount / "filler").write_bytes(b"\0" * (available - free))
    vfs = os.statvfs(mount)
    assert vfs.f_bavail * vfs.f_frsize == free


@pytest.mark.parametrize(
    ("free", "size"),
    [
        (600 * KIB, 1000 * KIB),  # the body itself does not fit (not even in place of the old content)
        (600 * KIB, 500 * KIB),  # the body fits, but not once more in the target: the reservation fails
    ],
    ids=["body-too-large", "no-room-to-commit"],
)
def test_a_full_disk_is_insufficient_storage_and_changes_nothing(
    agent: RunningAgent, small_fs: Path, free: int, size: int
) -> None:
    (small_fs / "kept").write_bytes((OLD * 61)[: 300 * KIB])
    fill_to(small_fs, free)
    before = snapshot(small_fs)
    for target in (small_fs / "kept", small_fs / "new-dir" / "new"):
        answer = httpx.post(
            agent.url + "/files",
            params={"path": str(target)},
            content=os.urandom(size),
            headers={"content-type": "application/octet-stream"},
        )
        assert answer.status_code == 507, answer.text
        assert answer.json()["message"].startswith("not enough disk space")
    assert snapshot(small_fs) == before
    vfs = os.statvfs(small_fs)
    assert vfs.f_bavail * vfs.f_frsize == free  # the spool and the reservation are gone with the request
