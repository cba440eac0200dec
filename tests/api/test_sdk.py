"""E2B's own SDK (the pinned 2.63) against ``wrenbox serve``: the calls users' code makes, end to end on
real VMs, through the REST API and the sandbox proxy on one port."""

from __future__ import annotations

import pathlib
import time
from datetime import UTC, datetime, timedelta

import anyio
import httpx
import pytest
import websockets
from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import NotFoundException, SandboxException

from .conftest import TEMPLATE, Server, wait_for

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]


def boot_id(sb: Sandbox) -> str:
    return sb.files.read("/proc/sys/kernel/random/boot_id").strip()


def test_create_run_read_kill(e2b_env: Server) -> None:
    sb = Sandbox.create(TEMPLATE, metadata={"suite": "api", "case": "basic"}, envs={"GREETING": "hi"})
    assert sb.commands.run("echo $GREETING from $(hostname)").stdout.startswith("hi from")
    sb.files.write("/tmp/note.txt", "written through the proxy")
    assert sb.files.read("/tmp/note.txt") == "written through the proxy"

    info = sb.get_info()
    assert (info.sandbox_id, info.template_id, info.state) == (sb.sandbox_id, TEMPLATE, SandboxState.RUNNING)
    assert info.metadata == {"suite": "api", "case": "basic"}
    assert info.memory_mb == 256
    assert info.cpu_count == 1
    assert info.end_at > info.started_at
    assert sb._envd_access_token  # v2 sandboxes are always secured

    assert sb.kill() is True
    assert sb.is_running() is False
    assert Sandbox.kill(sb.sandbox_id) is False  # already gone: 404
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sb.sandbox_id)


def test_pause_and_connect_keep_memory_and_token(e2b_env: Server) -> None:
    sb = Sandbox.create(TEMPLATE)
    sb.files.write("/tmp/kept", "across the pause")
    booted = boot_id(sb)
    counter = sb.commands.run(
        "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; "
        "sleep 0.2; done",
        background=True,
    )
    wait_for(lambda: sb.files.exists("/tmp/count"))  # counting before the pause

    assert sb.pause() is True
    assert sb.is_running() is False  # the proxy answers 502 "not found" for a paused sandbox
    assert Sandbox.get_info(sb.sandbox_id).state == SandboxState.PAUSED
    assert sb.pause() is False  # already paused: 409

    again = Sandbox.connect(sb.sandbox_id)
    assert again._envd_access_token == sb._envd_access_token
    assert sb.is_running() is True  # the old handle works again
    assert sb.files.read("/tmp/kept") == "across the pause"
    assert boot_id(sb) == booted
    assert counter.pid in [p.pid for p in sb.commands.list()]
    first = int(sb.files.read("/tmp/count"))
    time.sleep(1)
    assert int(sb.files.read("/tmp/count")) > first


def test_disk_only_pause_boots_again_with_files_and_token(e2b_env: Server) -> None:
    sb = Sandbox.create(TEMPLATE)
    sb.files.write("/home/user/kept", "on disk")
    sb.commands.run("sync")
    booted = boot_id(sb)
    assert sb.pause(keep_memory=False) is True
    Sandbox.connect(sb.sandbox_id)
    assert sb.files.read("/home/user/kept") == "on disk"
    assert boot_id(sb) != booted


def test_connect_extends_but_never_shortens(e2b_env: Server) -> None:
    sb = Sandbox.create(TEMPLATE, timeout=600)
    end = sb.get_info().end_at
    Sandbox.connect(sb.sandbox_id, timeout=30)
    assert abs((sb.get_info().end_at - end).total_seconds()) < 2
    Sandbox.connect(sb.sandbox_id, timeout=3600)
    assert (sb.get_info().end_at - end).total_seconds() > 2000
    sb.set_timeout(60)
    assert (sb.get_info().end_at - end).total_seconds() < -400


def state_of(sandbox_id: str) -> SandboxState | None:
    """Through the REST API, which (unlike traffic to the sandbox) does not count as using it."""
    try:
        return Sandbox.get_info(sandbox_id).state
    except NotFoundException:
        return None


def test_timeout_kills_by_default_and_pauses_when_asked(e2b_env: Server) -> None:
    killed = Sandbox.create(TEMPLATE, timeout=2)
    paused = Sandbox.create(TEMPLATE, timeout=2, lifecycle={"on_timeout": "pause"})
    disk_only = Sandbox.create(
        TEMPLATE, timeout=2, lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}}
    )
    booted = boot_id(disk_only)
    wait_for(lambda: state_of(killed.sandbox_id) is None, timeout=20)
    assert killed.is_running() is False
    wait_for(lambda: state_of(paused.sandbox_id) == SandboxState.PAUSED, timeout=20)
    wait_for(lambda: state_of(disk_only.sandbox_id) == SandboxState.PAUSED, timeout=20)
    Sandbox.connect(disk_only.sandbox_id)
    assert boot_id(disk_only) != booted  # paused without its memory: it booted again


def test_traffic_wakes_a_sandbox_that_auto_resumes(e2b_env: Server) -> None:
    sleepy = Sandbox.create(TEMPLATE, lifecycle={"on_timeout": "pause", "auto_resume": True})
    stays = Sandbox.create(TEMPLATE, lifecycle={"on_timeout": "pause", "auto_resume": False})
    sleepy.pause()
    stays.pause()
    assert sleepy.commands.run("echo awake").stdout == "awake\n"  # the request itself resumed it
    assert state_of(sleepy.sandbox_id) == SandboxState.RUNNING
    assert stays.is_running() is False
    assert state_of(stays.sandbox_id) == SandboxState.PAUSED


def test_fork_shares_files_with_a_new_token(e2b_env: Server) -> None:
    sb = Sandbox.create(TEMPLATE)
    sb.files.write("/tmp/parent", "inherited")
    (child,) = sb.fork()
    assert child.sandbox_id != sb.sandbox_id
    assert child._envd_access_token != sb._envd_access_token
    assert child.files.read("/tmp/parent") == "inherited"
    child.files.write("/tmp/parent", "changed in the child")
    assert sb.files.read("/tmp/parent") == "inherited"
    assert sb.is_running()
    sb.kill()
    with pytest.raises(NotFoundException):
        Sandbox.fork(sb.sandbox_id)


def test_snapshots_are_templates(e2b_env: Server) -> None:
    sb = Sandbox.create(TEMPLATE)
    sb.files.write("/tmp/snapped", "in the snapshot")
    snap = sb.create_snapshot(name="api-snap")
    assert sb.is_running()  # the source goes on
    assert any("api-snap" in name for name in snap.names)
    listed = [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=sb.sandbox_id).next_items()]
    assert snap.snapshot_id in listed

    child = Sandbox.create(snap.snapshot_id)
    assert child.files.read("/tmp/snapped") == "in the snapshot"
    child.kill()
    assert Sandbox.delete_snapshot(snap.snapshot_id) is True
    assert Sandbox.delete_snapshot(snap.snapshot_id) is False


def test_list_filters_and_pages(e2b_env: Server) -> None:
    tag = f"list{time.time_ns()}"
    made = [Sandbox.create(TEMPLATE, metadata={"tag": tag, "n": str(i)}) for i in range(3)]
    made[0].pause()

    everything = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}))
    seen = []
    pages = 0
    paginator = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}), limit=1)
    while paginator.has_next:
        seen += [s.sandbox_id for s in paginator.next_items()]
        pages += 1
    assert pages == 3
    assert seen == [s.sandbox_id for s in reversed(made)]  # newest first
    assert sorted(seen) == sorted(s.sandbox_id for s in everything.next_items())

    running = Sandbox.list(
        query=SandboxQuery(metadata={"tag": tag}, state=[SandboxState.RUNNING])
    ).next_items()
    assert sorted(s.sandbox_id for s in running) == sorted(s.sandbox_id for s in made[1:])
    one = Sandbox.list(query=SandboxQuery(metadata={"tag": tag, "n": "2"})).next_items()
    assert [s.sandbox_id for s in one] == [made[2].sandbox_id]

    # startedAfter is inclusive, to the microsecond shown: a sandbox's own startedAt finds it.
    for sb in made:
        started = sb.get_info().started_at
        found = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}, started_after=started)).next_items()
        assert sb.sandbox_id in [s.sandbox_id for s in found]
        later = started + timedelta(microseconds=1)
        found = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}, started_after=later)).next_items()
        assert sb.sandbox_id not in [s.sandbox_id for s in found]


def test_signed_file_urls_need_no_headers(e2b_env: Server) -> None:
    sb = Sandbox.create(TEMPLATE)
    sb.files.write("/tmp/signed.txt", "fetched by a plain client")
    url = sb.download_url("/tmp/signed.txt", use_signature_expiration=60)
    assert httpx.get(url).text == "fetched by a plain client"
    upload = sb.upload_url("/tmp/uploaded.txt")
    assert (
        httpx.post(upload, files={"file": ("uploaded.txt", b"sent unsigned-header-less")}).status_code == 200
    )
    assert sb.files.read("/tmp/uploaded.txt") == "sent unsigned-header-less"
    forged = url.replace("signature=v1_", "signature=v1_x")
    assert httpx.get(forged).status_code in (401, 502)


def test_a_users_web_server_through_the_proxy(e2b_env: Server) -> None:
    sb = Sandbox.create(TEMPLATE)
    sb.files.write("/tmp/www/index.html", "served from the guest")
    sb.commands.run("cd /tmp/www && python3 -m http.server 8000", background=True)
    headers = {"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "8000"}

    def served() -> httpx.Response | None:
        r = httpx.get(e2b_env.url + "/index.html", headers=headers)
        return r if r.status_code == 200 else None

    assert wait_for(served).text == "served from the guest"
    host = f"8000-{sb.sandbox_id}.{e2b_env.settings.api.domain}:{e2b_env.port}"
    assert httpx.get(e2b_env.url + "/index.html", headers={"Host": host}).text == "served from the guest"
    closed = httpx.get(e2b_env.url + "/", headers={**headers, "E2b-Sandbox-Port": "8001"})
    assert (closed.status_code, closed.json()["message"]) == (
        502,
        "The sandbox is running but port is not open",
    )


def test_killing_a_sandbox_cuts_its_streams(e2b_env: Server) -> None:
    sb = Sandbox.create(TEMPLATE)
    handle = sb.commands.run("sleep 60", background=True)
    Sandbox.kill(sb.sandbox_id)
    with pytest.raises(SandboxException):
        handle.wait()


def test_another_teams_key_sees_nothing(e2b_env: Server) -> None:
    sb = Sandbox.create(TEMPLATE)
    other = {"api_key": e2b_env.key("other-team")}
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sb.sandbox_id, **other)
    assert Sandbox.kill(sb.sandbox_id, **other) is False
    assert sb.sandbox_id not in [s.sandbox_id for s in Sandbox.list(**other).next_items()]
    with pytest.raises(NotFoundException):
        Sandbox.connect(sb.sandbox_id, **other)
    assert sb.is_running()


def test_metrics_are_sampled(e2b_env: Server) -> None:
    sb = Sandbox.create(TEMPLATE)
    metrics = wait_for(lambda: sb.get_metrics(), timeout=20)
    assert metrics[0].cpu_count == 1
    assert 0 < metrics[0].mem_used < metrics[0].mem_total
    assert sb.get_metrics(end=datetime.now(UTC) - timedelta(hours=1)) == []


def test_restart_keeps_every_sandbox_where_it_was(e2b_env: Server) -> None:
    running = Sandbox.create(TEMPLATE)
    running.files.write("/tmp/through-restart", "still here")
    paused = Sandbox.create(TEMPLATE)
    paused.pause()

    e2b_env.restart()

    assert Sandbox.get_info(running.sandbox_id).state == SandboxState.PAUSED  # paused at shutdown
    Sandbox.connect(running.sandbox_id)
    assert running.files.read("/tmp/through-restart") == "still here"
    Sandbox.connect(paused.sandbox_id)
    assert paused.commands.run("echo back").stdout == "back\n"


@pytest.mark.anyio
async def test_websockets_pass_through_the_proxy(e2b_env: Server) -> None:
    sb = Sandbox.create(TEMPLATE)
    sb.files.write("/tmp/ws_echo.py", (pathlib.Path(__file__).parent / "ws_echo.py").read_text())
    sb.commands.run("python3 /tmp/ws_echo.py 8765", background=True)
    url = e2b_env.url.replace("http://", "ws://") + "/chat?room=1"
    headers = {"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "8765", "X-Probe": "through"}

    async def connect():  # type: ignore[no-untyped-def]
        for _ in range(50):
            try:
                return await websockets.connect(url, additional_headers=headers, subprotocols=["echo"])
            except (OSError, websockets.InvalidStatus):
                await anyio.sleep(0.2)  # the server is still starting
        raise AssertionError("the guest's WebSocket server never answered")

    ws = await connect()
    assert ws.subprotocol == "echo"
    assert ws.response.headers["X-Seen-Header"] == "through"  # the client's headers reached the guest
    await ws.send("hello")
    assert await ws.recv() == "echo: hello"
    await ws.send(b"\x00\x01" * 40_000)
    assert await ws.recv() == b"echo:" + b"\x00\x01" * 40_000
    Sandbox.kill(sb.sandbox_id)  # the sandbox goes: so does the socket
    with pytest.raises(websockets.ConnectionClosed):
        await ws.recv()
    closed = {"E2b-Sandbox-Id": "nonexisting", "E2b-Sandbox-Port": "8765"}
    with pytest.raises(websockets.InvalidStatus):
        await websockets.connect(url, additional_headers=closed)


def test_templates_exist_and_have_one_tag(e2b_env: Server) -> None:
    from e2b import Template

    assert Template.exists(TEMPLATE) is True
    assert Template.exists("nosuch-template") is False
    (tag,) = Template.get_tags(TEMPLATE)
    assert tag.tag == "default"
    assert tag.build_id == Template.get_tags(TEMPLATE)[0].build_id  # stable
