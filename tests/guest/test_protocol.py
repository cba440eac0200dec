"""The agent's protocol where the SDK does not reach: codecs, streams, deadlines, replay, hostile input.

These talk Connect over raw httpx (HTTP/1.1 and h2c with prior knowledge), not through connectrpc, so
they check the wire format itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from protobuf import Oneof

from wrenbox.proto.filesystem import filesystem_pb as fs
from wrenbox.proto.process import process_pb as pb

from .conftest import RunningAgent
from .connect_wire import ConnectFailure, read_stream, server_stream, stream_request, unary

START = "/process.Process/Start"
CONNECT = "/process.Process/Connect"


@pytest.fixture(params=["http1", "h2c"])
def client(request: pytest.FixtureRequest, agent: RunningAgent) -> Iterator[httpx.Client]:
    h2c = request.param == "h2c"
    with httpx.Client(base_url=agent.url, http1=not h2c, http2=h2c, timeout=30) as c:
        yield c


def start_request(script: str, **kwargs: object) -> pb.StartRequest:
    return pb.StartRequest(
        process=pb.ProcessConfig(cmd="/bin/sh", args=["-c", script]), stdin=False, **kwargs
    )


def by_pid(pid: int) -> pb.ProcessSelector:
    return pb.ProcessSelector(selector=Oneof("pid", pid))


def events(messages: list) -> list[tuple[str, object]]:
    return [(m.event.event.field, m.event.event.value) for m in messages]


def output(messages: list, kind: str = "stdout") -> bytes:
    return b"".join(v.output.value for f, v in events(messages) if f == "data" and v.output.field == kind)


def running_pids(client: httpx.Client) -> list[int]:
    listed = unary(client, "/process.Process/List", pb.ListRequest(), pb.ListResponse)
    return [p.pid for p in listed.processes]


@pytest.mark.parametrize("codec", ["json", "proto"])
def test_start_stream_in_both_codecs(client: httpx.Client, codec: str) -> None:
    result = server_stream(
        client, START, start_request("echo out; echo err >&2; exit 3"), pb.StartResponse, codec
    )
    kinds = [field for field, _ in events(result.messages)]
    assert kinds[0] == "start"
    assert kinds[-1] == "end"
    assert output(result.messages) == b"out\n"
    assert output(result.messages, "stderr") == b"err\n"
    end = result.messages[-1].event.event.value
    assert (end.exit_code, end.exited, end.status, end.error) == (3, True, "exit status 3", "exit status 3")
    assert result.end == {}


@pytest.mark.parametrize("codec", ["json", "proto"])
def test_unary_in_both_codecs(client: httpx.Client, codec: str, workdir: Path) -> None:
    (workdir / "f").write_bytes(b"12345")
    reply = unary(
        client, "/filesystem.Filesystem/Stat", fs.StatRequest(path=str(workdir / "f")), fs.StatResponse, codec
    )
    assert reply.entry.size == 5
    assert reply.entry.type == fs.FileType.FILE


def test_errors_are_connect_codes(client: httpx.Client, workdir: Path) -> None:
    with pytest.raises(ConnectFailure) as missing:
        unary(
            client, "/filesystem.Filesystem/Stat", fs.StatRequest(path=str(workdir / "nope")), fs.StatResponse
        )
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    (workdir / "d").mkdir()
    with pytest.raises(ConnectFailure) as exists:
        unary(
            client,
            "/filesystem.Filesystem/MakeDir",
            fs.MakeDirRequest(path=str(workdir / "d")),
            fs.MakeDirResponse,
        )
    assert exists.value.code == "already_exists"
    with pytest.raises(ConnectFailure) as no_selector:
        unary(client, "/process.Process/SendSignal", pb.SendSignalRequest(), pb.SendSignalResponse)
    assert no_selector.value.code == "invalid_argument"
    with pytest.raises(ConnectFailure) as gone:
        unary(
            client,
            "/process.Process/CloseStdin",
            pb.CloseStdinRequest(process=by_pid(1)),
            pb.CloseStdinResponse,
        )
    assert gone.value.code == "not_found"
    result = server_stream(
        client, START, pb.StartRequest(process=pb.ProcessConfig(cmd="/no/such/cmd")), pb.StartResponse
    )
    assert result.end["error"]["code"] == "not_found"


def test_reconnect_replays_recent_output(client: httpx.Client) -> None:
    script = "echo first; while [ ! -e /proc/self ]; do :; done; sleep 0.6; echo second"
    with stream_request(client, START, start_request(script, tag="replay-me")) as response:
        stream = read_stream(response, pb.StartResponse)
        pid = next(stream).event.event.value.pid
        assert next(stream).event.event.value.output.value == b"first\n"
    # The first client is gone; a new one attaches by tag and gets the output it missed.
    tag = pb.ProcessSelector(selector=Oneof("tag", "replay-me"))
    result = server_stream(client, CONNECT, pb.ConnectRequest(process=tag), pb.ConnectResponse)
    assert events(result.messages)[0][1].pid == pid
    assert output(result.messages) == b"first\nsecond\n"
    assert events(result.messages)[-1][0] == "end"


def test_process_survives_client_disconnect(agent: RunningAgent) -> None:
    # Kill the TCP connection mid-stream, the rudest way a client can leave.
    with (
        httpx.Client(base_url=agent.url, timeout=10) as c,
        stream_request(c, START, start_request("sleep 30")) as r,
    ):
        pid = next(read_stream(r, pb.StartResponse)).event.event.value.pid
    time.sleep(0.3)
    with httpx.Client(base_url=agent.url, timeout=10) as c:
        assert pid in running_pids(c)
        unary(
            c,
            "/process.Process/SendSignal",
            pb.SendSignalRequest(process=by_pid(pid), signal=pb.Signal.SIGTERM),
            pb.SendSignalResponse,
        )
        result = server_stream(c, CONNECT, pb.ConnectRequest(process=by_pid(pid)), pb.ConnectResponse)
    end = result.messages[-1].event.event.value
    assert (end.exited, end.status) == (False, "signal: terminated")
    assert not _is_zombie(pid), "the agent must reap its children"


def test_deadline_ends_stream_not_process(client: httpx.Client) -> None:
    started = time.monotonic()
    result = server_stream(
        client, START, start_request("sleep 20"), pb.StartResponse, headers={"connect-timeout-ms": "400"}
    )
    assert time.monotonic() - started < 5
    assert result.end["error"]["code"] == "deadline_exceeded"
    pid = result.messages[0].event.event.value.pid
    assert pid in running_pids(client)
    unary(
        client,
        "/process.Process/SendSignal",
        pb.SendSignalRequest(process=by_pid(pid), signal=pb.Signal.SIGKILL),
        pb.SendSignalResponse,
    )


def test_keepalives_while_quiet(client: httpx.Client) -> None:
    result = server_stream(
        client, START, start_request("sleep 2.5"), pb.StartResponse, headers={"keepalive-ping-interval": "1"}
    )
    kinds = [field for field, _ in events(result.messages)]
    assert kinds.count("keepalive") >= 2
    assert kinds[-1] == "end"


def test_signal_reaches_the_process(client: httpx.Client) -> None:
    script = "trap 'echo got-term; exit 5' TERM; echo ready; while :; do sleep 0.05; done"
    with stream_request(client, START, start_request(script)) as response:
        stream = read_stream(response, pb.StartResponse)
        pid = next(stream).event.event.value.pid
        assert next(stream).event.event.value.output.value == b"ready\n"
        unary(
            client,
            "/process.Process/SendSignal",
            pb.SendSignalRequest(process=by_pid(pid), signal=pb.Signal.SIGTERM),
            pb.SendSignalResponse,
        )
        rest = [m for m in stream if not isinstance(m, dict)]
    assert output(rest) == b"got-term\n"
    assert rest[-1].event.event.value.exit_code == 5


def test_large_output_arrives_complete(client: httpx.Client) -> None:
    # 20 MB through pipes and the subscriber's backpressure, byte for byte.
    result = server_stream(
        client, START, start_request("head -c 20000000 /dev/zero | tr '\\0' x"), pb.StartResponse, "proto"
    )
    assert output(result.messages) == b"x" * 20_000_000


def test_tags_are_unique_among_running_processes(client: httpx.Client) -> None:
    with stream_request(client, START, start_request("sleep 5", tag="only-one")) as response:
        pid = next(read_stream(response, pb.StartResponse)).event.event.value.pid
        second = server_stream(client, START, start_request("true", tag="only-one"), pb.StartResponse)
        assert second.end["error"]["code"] == "invalid_argument"
        unary(
            client,
            "/process.Process/SendSignal",
            pb.SendSignalRequest(process=by_pid(pid), signal=pb.Signal.SIGKILL),
            pb.SendSignalResponse,
        )


def test_watch_dir_stream(client: httpx.Client, workdir: Path) -> None:
    request = fs.WatchDirRequest(path=str(workdir), recursive=True)
    headers = {"connect-timeout-ms": "1500", "keepalive-ping-interval": "1"}
    with stream_request(client, "/filesystem.Filesystem/WatchDir", request, headers=headers) as response:
        stream = read_stream(response, fs.WatchDirResponse)
        assert next(stream).event.field == "start"
        (workdir / "d").mkdir()
        (workdir / "d" / "f.txt").write_text("x")
        seen = [m for m in stream if not isinstance(m, dict)]
    names = [(m.event.value.name, m.event.value.type) for m in seen if m.event.field == "filesystem"]
    assert ("d", fs.EventType.CREATE) in names
    assert ("d/f.txt", fs.EventType.CREATE) in names


class TestHostilePaths:
    def stat(self, client: httpx.Client, path: str) -> fs.StatResponse:
        return unary(client, "/filesystem.Filesystem/Stat", fs.StatRequest(path=path), fs.StatResponse)

    def test_nul_and_huge_paths(self, client: httpx.Client) -> None:
        for path in ("/tmp/a\0b", "/" + "x" * 100_000):
            with pytest.raises(ConnectFailure) as caught:
                self.stat(client, path)
            assert caught.value.code == "invalid_argument"

    def test_symlink_loop(self, client: httpx.Client, workdir: Path) -> None:
        (workdir / "loop").symlink_to(workdir / "loop")
        entry = self.stat(client, str(workdir / "loop")).entry
        assert entry.is_symlink
        with pytest.raises(ConnectFailure) as caught:
            unary(
                client,
                "/filesystem.Filesystem/ListDir",
                fs.ListDirRequest(path=str(workdir / "loop")),
                fs.ListDirResponse,
            )
        assert caught.value.code == "invalid_argument"
        listing = unary(
            client,
            "/filesystem.Filesystem/ListDir",
            fs.ListDirRequest(path=str(workdir), depth=5),
            fs.ListDirResponse,
        )
        assert [e.name for e in listing.entries] == ["loop"]

    def test_non_utf8_names(self, client: httpx.Client, workdir: Path, agent: RunningAgent) -> None:
        os.close(os.open(os.fsencode(workdir) + b"/bad-\xff.txt", os.O_CREAT | os.O_WRONLY))
        listing = unary(
            client, "/filesystem.Filesystem/ListDir", fs.ListDirRequest(path=str(workdir)), fs.ListDirResponse
        )
        assert [e.name for e in listing.entries] == ["bad-\ufffd.txt"]
        response = httpx.get(agent.url + "/files?path=%FF%FE")
        assert response.status_code == 400

    def test_dot_dot_is_just_a_path(self, client: httpx.Client, workdir: Path) -> None:
        (workdir / "x").mkdir()
        assert self.stat(client, str(workdir / "x" / ".." / "x")).entry.path == str(workdir / "x")

    def test_fifo_download_does_not_hang(self, agent: RunningAgent, workdir: Path) -> None:
        os.mkfifo(workdir / "pipe")
        response = httpx.get(agent.url + "/files", params={"path": str(workdir / "pipe")}, timeout=5)
        assert response.status_code == 400
        assert "not a regular file" in response.json()["message"]
        assert httpx.get(agent.url + "/health").status_code == 204


class TestFilesEndpoint:
    def test_upload_octet_stream_and_gzip(self, agent: RunningAgent, workdir: Path) -> None:
        import gzip

        target = workdir / "raw" / "file.bin"
        response = httpx.post(
            agent.url + "/files",
            params={"path": str(target)},
            content=gzip.compress(b"zipped payload"),
            headers={"content-type": "application/octet-stream", "content-encoding": "gzip"},
        )
        assert response.status_code == 200
        assert response.json() == [{"name": "file.bin", "type": "file", "path": str(target)}]
        assert target.read_bytes() == b"zipped payload"
        download = httpx.get(
            agent.url + "/files", params={"path": str(target)}, headers={"accept-encoding": "gzip"}
        )
        assert download.headers["content-encoding"] == "gzip"
        assert download.content == b"zipped payload"  # httpx inflates it

    def test_unknown_user_is_401(self, agent: RunningAgent, workdir: Path) -> None:
        response = httpx.get(
            agent.url + "/files", params={"path": "/etc/hostname", "username": "no-such-user-x"}
        )
        assert response.status_code == 401

    def test_truncated_multipart_is_rejected(self, agent: RunningAgent, workdir: Path) -> None:
        body = (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="'
            + str(workdir / "t").encode()
            + b'"\r\n\r\ndata'
        )
        response = httpx.post(
            agent.url + "/files", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert response.status_code == 400


def test_access_token(fresh_agent: RunningAgent, workdir: Path) -> None:
    from wrenbox.guest.auth import file_signature

    url = fresh_agent.url
    assert httpx.post(url + "/init", json={"accessToken": "s3cret", "envVars": {"A": "1"}}).status_code == 204
    token = {"x-access-token": "s3cret"}
    assert httpx.get(url + "/envs").status_code == 401
    assert httpx.get(url + "/envs", headers={"x-access-token": "wrong"}).status_code == 401
    assert httpx.get(url + "/envs", headers=token).json() == {"A": "1"}
    assert httpx.get(url + "/health").status_code == 204
    assert httpx.post(url + "/init", json={"accessToken": "other"}).status_code == 401
    with httpx.Client(base_url=url) as c:
        with pytest.raises(ConnectFailure) as caught:
            unary(c, "/process.Process/List", pb.ListRequest(), pb.ListResponse)
        assert (caught.value.status, caught.value.code) == (401, "unauthenticated")
        assert unary(c, "/process.Process/List", pb.ListRequest(), pb.ListResponse, headers=token) is not None

    (workdir / "f").write_text("signed")
    path = str(workdir / "f")
    assert httpx.get(url + "/files", params={"path": path}).status_code == 401
    good = {"path": path, "signature": file_signature(path, "read", "", "s3cret", None)}
    assert httpx.get(url + "/files", params=good).text == "signed"
    wrong_op = {"path": path, "signature": file_signature(path, "write", "", "s3cret", None)}
    assert httpx.get(url + "/files", params=wrong_op).status_code == 401
    expired = int(time.time()) - 10
    old = {
        "path": path,
        "signature": file_signature(path, "read", "", "s3cret", expired),
        "signature_expiration": expired,
    }
    refused = httpx.get(url + "/files", params=old)
    assert (refused.status_code, refused.json()) == (
        401,
        {"code": 401, "message": "signature is already expired"},
    )

    # Rotating the token needs the current one.
    assert httpx.post(url + "/init", json={"accessToken": "next"}, headers=token).status_code == 204
    assert httpx.get(url + "/envs", headers=token).status_code == 401
    assert httpx.get(url + "/envs", headers={"x-access-token": "next"}).status_code == 200


@pytest.mark.root
def test_commands_and_files_as_another_user(agent: RunningAgent, workdir: Path) -> None:
    import base64

    nobody = {"authorization": "Basic " + base64.b64encode(b"nobody:").decode()}
    with httpx.Client(base_url=agent.url) as c:
        result = server_stream(
            c, START, start_request("id -un; echo $HOME"), pb.StartResponse, headers=nobody
        )
        assert output(result.messages).split(b"\n")[0] == b"nobody"
        ghost = {"authorization": "Basic " + base64.b64encode(b"ghost-user-x:").decode()}
        denied = server_stream(c, START, start_request("true"), pb.StartResponse, headers=ghost)
        assert denied.end["error"]["code"] == "unauthenticated"
    target = workdir / "owned" / "by-nobody.txt"
    response = httpx.post(
        agent.url + "/files",
        params={"path": str(target), "username": "nobody"},
        content=b"x",
        headers={"content-type": "application/octet-stream"},
    )
    assert response.status_code == 200
    assert target.stat().st_uid == target.parent.stat().st_uid == 65534


def test_agent_survives_garbage(agent: RunningAgent) -> None:
    with socket.create_connection(("127.0.0.1", agent.port)) as raw:
        raw.sendall(b"\x00\xff garbage that is no HTTP at all\r\n\r\n")
        raw.settimeout(2)
        with contextlib.suppress(TimeoutError):
            raw.recv(100)
    with httpx.Client(base_url=agent.url) as c:
        bad = c.post(
            "/process.Process/List", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400
        assert (
            c.post("/init", content=b"[1, 2", headers={"content-type": "application/json"}).status_code == 400
        )
        assert c.get("/nope").status_code == 404
        assert c.get("/health").status_code == 204


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return False
