"""Hostile input to the agent (a real ``python -m wrenbox.guest``): malformed Connect envelopes, bodies
that are not what their content type says, odd and traversing paths, bad UTF-8, and slowloris clients.

Every request gets a 4xx answer (for a Connect stream: an end-stream error with a client's code), a
valid request's answer, or a closed connection; never a 5xx or a server-side code. Nothing changes on
disk outside the one directory the requests may write to, and the agent keeps serving meanwhile.

The agent runs as ``nobody`` here: fuzzed bytes can form valid requests (an empty protobuf is a valid
``RemoveRequest`` for the home directory), and as root on the host those would be destructive.
``WRENBOX_FUZZ_EXAMPLES`` sets the number of examples per fuzz test (default 150; ``--soak``: 3000).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wrenbox

from .conftest import RunningAgent, start_agent

pytestmark = [pytest.mark.root, pytest.mark.slow]

NOBODY = 65534
EXAMPLES = int(os.environ.get("WRENBOX_FUZZ_EXAMPLES", "150"))
SOAK_EXAMPLES = int(os.environ.get("WRENBOX_FUZZ_SOAK_EXAMPLES", "3000"))
BODY_TIMEOUT, KEEP_ALIVE = 2.0, 3.0  # the agent's, shortened so the slow clients' fate is seen soon
# Connect codes that blame the client (or that the client asked for, as a deadline).
CLIENT_CODES = {
    "invalid_argument",
    "not_found",
    "already_exists",
    "permission_denied",
    "unauthenticated",
    "failed_precondition",
    "out_of_range",
    "resource_exhausted",
    "deadline_exceeded",
    "canceled",
}
RPCS = [
    *(f"/process.Process/{m}" for m in ("List", "Connect", "Start", "Update", "StreamInput")),
    *(f"/process.Process/{m}" for m in ("SendInput", "SendSignal", "CloseStdin")),
    *(f"/filesystem.Filesystem/{m}" for m in ("Stat", "MakeDir", "Move", "ListDir", "Remove", "WatchDir")),
    *(f"/filesystem.Filesystem/{m}" for m in ("CreateWatcher", "GetWatcherEvents", "RemoveWatcher")),
    "/filesystem.Filesystem/Nope",
    "/process.Process/",
]
STREAMS = {f"/process.Process/{m}" for m in ("Connect", "Start", "StreamInput")} | {
    "/filesystem.Filesystem/WatchDir"
}
RPC_TYPES = [
    "application/connect+json",
    "application/connect+proto",
    "application/json",
    "application/proto",
    "application/grpc",
    "application/grpc-web+proto",
    "application/connect+xml",
    "text/plain",
    "",
]


def _unprivileged_python(env: dict[str, str]) -> list[str]:
    """``setpriv`` to nobody and an interpreter nobody can run that imports this checkout's agent."""
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    major, minor = sys.version_info[:2]
    for python in (sys.executable, f"/usr/bin/python{major}.{minor}"):
        probe = [*drop, python, "-c", "import wrenbox.guest.services"]
        if subprocess.run(probe, env=env, capture_output=True, check=False, cwd="/").returncode == 0:
            return [*drop, python]
    pytest.skip("no Python interpreter that user nobody can run imports the agent")


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """``ROOT/box`` (nobody's: requests may write there) beside ``ROOT/outside`` (root's, must not change)."""
    root = Path(tempfile.mkdtemp(prefix="wbg-hostile-", dir="/tmp"))
    root.chmod(0o755)
    box = root / "box"
    box.mkdir()
    os.chown(box, NOBODY, NOBODY)
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(os.urandom(64))
    (outside / "secret").chmod(0o644)
    yield root
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def hostile_agent(scratch: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    src = str(Path(wrenbox.__file__).parents[1])
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{src}:{sysconfig.get_paths()['purelib']}"}
    log = tmp_path_factory.mktemp("hostile") / "agent.log"
    timeouts = ["--body-timeout", str(BODY_TIMEOUT), "--keep-alive", str(KEEP_ALIVE)]
    running = start_agent("127.0.0.1:0", log, *timeouts, env=env, python=_unprivileged_python(env))
    yield running
    running.stop()
    assert "Traceback" not in running.log(), running.log()[-4000:]


def tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """Everything under ``root`` but ``box``: mode, owner and content (or link target) by path."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames.remove("box")
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.lstat()
            if path.is_symlink():
                content = str(path.readlink())
            elif path.is_file():
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = ""
            found[str(path)] = (st.st_mode, st.st_uid, content)
    return found


# -- strategies --------------------------------------------------------------------------------------


def odd_paths(root: Path) -> st.SearchStrategy[str]:
    box = root / "box"
    fixed = [
        "",
        ".",
        "..",
        "~",
        "~root",
        "~/../..",
        f"{box}/../outside/secret",
        f"{box}/../outside/new",
        f"{box}/../../../etc/shadow",
        f"{root}/outside",
        f"{box}/a\x00b",
        f"{box}/" + "n" * 300,
        f"{box}/" + "d/" * 3000,
        f"{box}/\udcff\udcfe",  # not UTF-8 once encoded: a lone surrogate
        f"{box}/é ü",
        f"{box}//x/./y/../z",
        f"{box}/\n\r\t",
        "/proc/self/mem",
        "/dev/zero",
    ]
    names = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12)
    return st.sampled_from(fixed) | names.map(lambda n: f"{box}/{n}")


def json_payloads(root: Path) -> st.SearchStrategy[object]:
    paths = odd_paths(root)
    scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=16)
    values = st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner)
    )
    return st.one_of(
        values,
        st.fixed_dictionaries({"path": paths}, optional={"depth": values, "recursive": values}),
        st.fixed_dictionaries({"source": paths, "destination": paths}),
        st.fixed_dictionaries(
            {
                "process": st.fixed_dictionaries(
                    {"cmd": st.sampled_from(["/bin/true", "", "x" * 5000])},
                    optional={"cwd": paths, "envs": values, "args": values},
                )
            }
        ),
        st.fixed_dictionaries(
            {"process": st.fixed_dictionaries({"pid": values})}, optional={"input": values}
        ),
    )


def encoded(root: Path) -> st.SearchStrategy[bytes]:
    """A payload: JSON (UTF-8, lone surrogates passed through as bad UTF-8, maybe one byte broken), or
    arbitrary bytes (what a protobuf parser must survive)."""
    as_json = json_payloads(root).map(
        lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")
    )
    broken = st.tuples(as_json, st.integers(0, 64), st.binary(min_size=1, max_size=2)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
    )
    return as_json | broken | st.binary(max_size=96)


@st.composite
def envelopes(draw: st.DrawFn, root: Path) -> bytes:
    """Connect envelopes with flags, declared lengths and truncation of any kind."""
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        payload = draw(encoded(root))
        flags = draw(st.sampled_from([0, 0, 0, 1, 2, 3, 0x80]) | st.integers(0, 255))
        length = len(payload) + draw(st.sampled_from([0, 0, 0, 1, -1, 1000])) if payload else 0
        length = draw(st.sampled_from([max(length, 0), 2**32 - 1, 2**22 + 1]))
        out += struct.pack(">BI", flags, length) + payload
    cut = draw(st.none() | st.integers(0, max(len(out) - 1, 0)))
    return out if cut is None else out[:cut]


# -- checks ------------------------------------------------------------------------------------------


def assert_refused_or_valid(response: httpx.Response) -> None:
    """4xx (with a client's code where there is one), or 200 and, for a stream, no server-side code."""
    status, body = response.status_code, response.content
    assert status < 500, (status, body[:300])
    content_type = response.headers.get("content-type", "")
    if content_type.startswith("application/connect+"):
        end = _end_stream(body)
        if end is not None and "error" in end:
            assert end["error"]["code"] in CLIENT_CODES, end
    elif status >= 400 and content_type == "application/json" and body:
        code = json.loads(body).get("code")
        assert code in CLIENT_CODES or code == status, (status, body[:300])


def _end_stream(body: bytes) -> dict | None:
    while len(body) >= 5:
        flags, length = struct.unpack(">BI", body[:5])
        if flags & 0x02:
            return json.loads(body[5 : 5 + length] or b"{}")
        body = body[5 + length :]
    return None


def _fuzz_settings(examples: int):  # type: ignore[no-untyped-def]
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# -- the Connect endpoints ---------------------------------------------------------------------------


def _connect_case(agent: RunningAgent, scratch: Path, data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(RPCS), label="rpc")
    # Half the time the type the method expects, so that most bodies reach the envelope and codec layers.
    fitting = ["application/connect+json", "application/connect+proto"] if path in STREAMS else RPC_TYPES[2:4]
    content_type = data.draw(st.sampled_from(fitting) | st.sampled_from(RPC_TYPES), label="content-type")
    streaming = content_type.startswith(("application/connect+", "application/grpc"))
    body = data.draw(envelopes(scratch) if streaming else encoded(scratch), label="body")
    headers = {"content-type": content_type, "connect-protocol-version": "1", "connect-timeout-ms": "1500"}
    if data.draw(st.booleans(), label="compressed"):
        headers["connect-content-encoding"] = data.draw(st.sampled_from(["gzip", "br", "bogus"]))
    before = tree(scratch)
    try:
        response = httpx.post(agent.url + path, content=body, headers=headers, timeout=15)
    except httpx.RemoteProtocolError:
        pass  # the connection was closed: an accepted way to refuse
    else:
        assert_refused_or_valid(response)
    assert tree(scratch) == before


def test_connect_endpoints_refuse_malformed_requests(hostile_agent: RunningAgent, scratch: Path) -> None:
    @_fuzz_settings(EXAMPLES)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        _connect_case(hostile_agent, scratch, data)

    run()
    assert httpx.get(hostile_agent.url + "/health").status_code == 204


@pytest.mark.soak
def test_connect_endpoints_refuse_malformed_requests_long(hostile_agent: RunningAgent, scratch: Path) -> None:
    @_fuzz_settings(SOAK_EXAMPLES)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        _connect_case(hostile_agent, scratch, data)

    run()


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (struct.pack(">BI", 0, 100) + b'{"path": "/"}', "ended inside an envelope"),
        (struct.pack(">BI", 2, 2) + b"{}", "flags 0x02"),
        (struct.pack(">BI", 1, 2) + b"{}", "flags 0x01"),
        (b"", "has none"),
        ((struct.pack(">BI", 0, 13) + b'{"path": "/"}') * 2, "has more"),
    ],
)
def test_a_malformed_stream_is_the_clients_error(
    hostile_agent: RunningAgent, frames: bytes, message: str
) -> None:
    """What the envelope guard answers, case by case (connectrpc alone says internal or unimplemented)."""
    response = httpx.post(
        hostile_agent.url + "/filesystem.Filesystem/WatchDir",
        content=frames,
        headers={"content-type": "application/connect+json", "connect-timeout-ms": "1000"},
        timeout=15,
    )
    end = _end_stream(response.content)
    assert end is not None
    assert end["error"]["code"] == "invalid_argument"
    assert message in end["error"]["message"]


# -- /files --------------------------------------------------------------------------------------------


def _files_case(agent: RunningAgent, scratch: Path, data: st.DataObject) -> None:
    raw_path = data.draw(
        odd_paths(scratch).map(lambda p: p.encode("utf-8", "surrogateescape"))
        | st.binary(max_size=24).map(lambda b: bytes(scratch / "box") + b"/" + b),
        label="path",
    )
    query = "path=" + quote_from_bytes(raw_path)
    if data.draw(st.booleans(), label="username"):
        query += "&username=" + quote_from_bytes(data.draw(st.binary(max_size=12)))
    before = tree(scratch)
    if data.draw(st.booleans(), label="download"):
        headers = {"accept-encoding": data.draw(st.sampled_from(["gzip", "", "identity", "gzip;q=0"]))}
        request = httpx.Request("GET", f"{agent.url}/files?{query}", headers=headers)
    else:
        content_type = data.draw(
            st.sampled_from(
                [
                    "application/octet-stream",
                    "multipart/form-data; boundary=xyz",
                    "multipart/form-data",
                    "multipart/form-data; boundary=",
                    "text/plain",
                    "",
                ]
            ),
            label="content-type",
        )
        part = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="' + raw_path + b'"\r\n\r\n'
        body = data.draw(
            st.binary(max_size=200)
            | st.tuples(
                st.just(part), st.binary(max_size=64), st.sampled_from([b"\r\n--xyz--\r\n", b"", b"--"])
            ).map(b"".join),
            label="body",
        )
        headers = {"content-type": content_type}
        if data.draw(st.booleans(), label="gzip"):
            headers["content-encoding"] = "gzip"
        request = httpx.Request("POST", f"{agent.url}/files?{query}", content=body, headers=headers)
    try:
        with httpx.Client(timeout=15) as client:
            response = client.send(request)
    except httpx.RemoteProtocolError:
        pass
    else:
        assert_refused_or_valid(response)
    assert tree(scratch) == before


def test_files_endpoint_refuses_odd_paths_and_bodies(hostile_agent: RunningAgent, scratch: Path) -> None:
    @_fuzz_settings(EXAMPLES)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        _files_case(hostile_agent, scratch, data)

    run()
    assert httpx.get(hostile_agent.url + "/health").status_code == 204


@pytest.mark.soak
def test_files_endpoint_refuses_odd_paths_and_bodies_long(hostile_agent: RunningAgent, scratch: Path) -> None:
    @_fuzz_settings(SOAK_EXAMPLES)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        _files_case(hostile_agent, scratch, data)

    run()


# -- slow clients ------------------------------------------------------------------------------------


def _connect(port: int) -> socket.socket:
    # The timeout is the test's bound: a server that never ends a slow client fails with TimeoutError.
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def _answer_or_close(sock: socket.socket) -> bytes:
    """What the server sends before it closes (b"" when it just closes); TimeoutError if it never does."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_slow_clients_are_cut_off_and_others_served(hostile_agent: RunningAgent, scratch: Path) -> None:
    """Dribbled headers and bodies that never complete, on many sockets: a normal client is served
    meanwhile; the stalled bodies are refused (408 or Connect's canceled, 499) after the body timeout,
    the dribbling connections closed after the keep-alive timeout."""
    port = hostile_agent.port
    target = scratch / "box" / "slow-upload"
    heads = {
        "files": f"POST /files?path={target} HTTP/1.1\r\nhost: x\r\n"
        "content-type: application/octet-stream\r\n",
        "rpc": "POST /filesystem.Filesystem/Stat HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n",
        "stream": "POST /filesystem.Filesystem/WatchDir HTTP/1.1\r\nhost: x\r\n"
        "content-type: application/connect+json\r\n",
    }
    stalled: list[tuple[str, socket.socket]] = []
    for kind, head in heads.items():
        for _ in range(10):
            sock = _connect(port)
            sock.sendall(f"{head}content-length: 1000\r\n\r\n".encode() + b'{"pa')
            stalled.append((kind, sock))
    dribblers = [_connect(port) for _ in range(30)]
    stop = threading.Event()

    def dribble() -> None:
        line = b"GET /health HTTP/1.1\r\nx-slow: " + b"a" * 200
        for byte in line:
            for sock in dribblers:
                with contextlib.suppress(OSError):
                    sock.send(bytes([byte]))
            if stop.wait(0.2):
                return

    feeder = threading.Thread(target=dribble)
    feeder.start()
    try:
        with httpx.Client(base_url=hostile_agent.url, timeout=10) as client:
            for _ in range(5):
                answer = client.post("/filesystem.Filesystem/Stat", json={"path": str(scratch)})
                assert answer.status_code == 200, answer.text
                assert (
                    client.get("/files", params={"path": str(scratch / "outside/secret")}).status_code == 200
                )
        for kind, sock in stalled:
            answer = _answer_or_close(sock)
            expected = {"files": b"HTTP/1.1 408", "rpc": b"HTTP/1.1 499", "stream": b"HTTP/1.1 200"}[kind]
            assert answer.startswith(expected), (kind, answer[:300])
            if kind == "stream":  # a Connect stream's error is its end-stream message
                assert b'"code": "canceled"' in answer, answer[-300:]
        for sock in dribblers:  # closed (their headers never completed), without an answer to them
            assert not _answer_or_close(sock).startswith(b"HTTP/1.1 2")
    finally:
        stop.set()
        feeder.join()
        for _, sock in stalled:
            sock.close()
        for sock in dribblers:
            sock.close()


def test_a_stalled_upload_leaves_the_file_as_it_was(hostile_agent: RunningAgent, scratch: Path) -> None:
    target = scratch / "box" / "kept"
    answer = httpx.post(
        hostile_agent.url + "/files",
        params={"path": str(target)},
        content=b"the old content",
        headers={"content-type": "application/octet-stream"},
    )
    assert answer.status_code == 200, answer.text
    with _connect(hostile_agent.port) as sock:
        head = f"POST /files?path={target} HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\n"
        sock.sendall(f"{head}content-length: 1000\r\n\r\nnew".encode())
        assert _answer_or_close(sock).startswith(b"HTTP/1.1 408")
    assert target.read_bytes() == b"the old content"


def test_a_client_leaving_mid_upload_is_no_error(hostile_agent: RunningAgent, scratch: Path) -> None:
    """A client that hangs up inside its body leaves no traceback in the agent's log (see the fixture)."""
    target = scratch / "box" / "left"
    with _connect(hostile_agent.port) as sock:
        head = f"POST /files?path={target} HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\n"
        sock.sendall(f"{head}content-length: 1000\r\n\r\nsome".encode())
    assert httpx.get(hostile_agent.url + "/health").status_code == 204


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_kernel_file_that_refuses_io_is_the_clients_error(hostile_agent: RunningAgent, method: str) -> None:
    """/proc/self/mem reads and writes fail (EIO at offset 0): a 400 naming it, not a 500 or a cut 200."""
    answer = httpx.request(
        method,
        hostile_agent.url + "/files",
        params={"path": "/proc/self/mem"},
        content=b"x" if method == "POST" else None,
        headers={"content-type": "application/octet-stream"},
    )
    assert answer.status_code == 400, answer.text
    assert "/proc/self/mem" in answer.json()["message"]
