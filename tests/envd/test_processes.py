"""Processes through the envd client, against a real agent, in both client flavours."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from wrenbox.envd import AsyncEnvdClient, EnvdConfig, Exited, PtyOutput, Started, Stderr, Stdout
from wrenbox.errors import InvalidArgument, NotFound, Timeout

pytestmark = pytest.mark.anyio


def _tag() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


async def _running(envd: Any, pid: int) -> bool:
    return any(info.pid == pid for info in await envd.processes.list())


async def _wait_gone(envd: Any, pid: int, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while await _running(envd, pid):  # noqa: ASYNC110 - polling the agent, not a local flag
            await anyio.sleep(0.05)


async def test_exec_collects_output_and_exit_code(envd: Any) -> None:
    result = await envd.processes.exec("echo out; echo err >&2; exit 3")
    assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 3)
    assert not result.ok
    assert result.pid > 0
    assert 0 < result.duration < 30
    assert not result.stdout_truncated
    assert not result.stderr_truncated


async def test_exec_argv_is_not_shell_interpreted(envd: Any) -> None:
    result = await envd.processes.exec(["printf", "%s|", "a b", "$HOME", "*"])
    assert result.ok
    assert result.stdout == b"a b|$HOME|*|"


async def test_exec_env_and_cwd(envd: Any, tmp_path: Path) -> None:
    result = await envd.processes.exec(
        'echo "$GREETING"; pwd', envs={"GREETING": "hi there"}, cwd=str(tmp_path)
    )
    assert result.stdout.decode().splitlines() == ["hi there", str(tmp_path)]


async def test_exec_output_cap_truncates_but_keeps_exit_code(envd: Any) -> None:
    result = await envd.processes.exec(
        "head -c 300000 /dev/zero | tr '\\0' x; echo -n short >&2; exit 7", output_cap=1000
    )
    assert result.exit_code == 7
    assert result.stdout == b"x" * 1000
    assert result.stdout_truncated
    assert result.stderr == b"short"
    assert not result.stderr_truncated


async def test_exec_feeds_stdin(envd: Any) -> None:
    result = await envd.processes.exec(["sh", "-c", "tr a-z A-Z; echo end"], stdin=b"hello\n")
    assert result.stdout == b"HELLO\nend\n"


async def test_exec_stdin_for_a_command_that_exits_without_reading(envd: Any) -> None:
    result = await envd.processes.exec(["true"], stdin=b"unread")
    assert result.ok


async def test_concurrent_execs(async_envd: AsyncEnvdClient) -> None:
    results: dict[int, bytes] = {}

    async def run(i: int) -> None:
        results[i] = (await async_envd.processes.exec(["sh", "-c", f"sleep 0.2; echo {i}"])).stdout

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(run, i)
    assert results == {i: f"{i}\n".encode() for i in range(8)}


async def test_exec_timeout_kills_the_process(envd: Any, tmp_path: Path) -> None:
    pid_file = anyio.Path(tmp_path / "pid")
    with pytest.raises(Timeout, match="killed"):
        await envd.processes.exec(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 30"], timeout=1.0)
    await _wait_gone(envd, int(await pid_file.read_text()))


async def test_exec_stream_yields_typed_events(envd: Any) -> None:
    async with envd.processes.exec_stream("echo a; echo b >&2; exit 2") as proc:
        events = [event async for event in proc]
    assert events[0] == Started(proc.pid)
    assert events[-1] == Exited(2, events[-1].error)
    assert Stdout(b"a\n") in events
    assert Stderr(b"b\n") in events
    assert len(events) == 4


async def test_leaving_a_stream_detaches_and_reconnect_by_tag_replays(envd: Any) -> None:
    tag = _tag()
    async with envd.processes.exec_stream(["sh", "-c", "echo ready; exec sleep 60"], tag=tag) as proc:
        pid = proc.pid
        async for event in proc:
            if event == Stdout(b"ready\n"):
                break
    assert await _running(envd, pid)
    infos = {info.pid: info for info in await envd.processes.list()}
    assert infos[pid].tag == tag
    assert (infos[pid].cmd, infos[pid].args) == ("sh", ("-c", "echo ready; exec sleep 60"))

    async with envd.processes.connect(tag) as again:
        assert again.pid == pid
        seen = []
        async for event in again:
            seen.append(event)
            if event == Stdout(b"ready\n"):
                await envd.processes.kill(tag)
        assert seen[0] == Started(pid)
        assert isinstance(seen[-1], Exited)
        assert seen[-1].exit_code != 0
    await _wait_gone(envd, pid)


async def test_cancelling_a_stream_leaves_the_process_running(async_envd: AsyncEnvdClient) -> None:
    ticker = ["sh", "-c", "while :; do echo tick; sleep 0.1; done"]
    pid = 0
    with anyio.move_on_after(1.0) as scope:
        async with async_envd.processes.exec_stream(ticker, tag=_tag()) as proc:
            pid = proc.pid
            async for _ in proc:
                pass
    assert scope.cancelled_caught
    assert pid
    await anyio.sleep(0.3)
    assert await _running(async_envd, pid)
    async with async_envd.processes.connect(pid) as again:
        first_output = await anext(event async for event in again if isinstance(event, Stdout))
    assert first_output.data.startswith(b"tick")
    await async_envd.processes.kill(pid)
    await _wait_gone(async_envd, pid)


async def test_cancelling_exec_kills_the_command(async_envd: AsyncEnvdClient, tmp_path: Path) -> None:
    pid_file = anyio.Path(tmp_path / "pid")
    with anyio.move_on_after(1.0) as scope:
        await async_envd.processes.exec(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 30"])
    assert scope.cancelled_caught
    await _wait_gone(async_envd, int(await pid_file.read_text()))


async def test_background_start_stdin_and_connect_by_pid(envd: Any) -> None:
    pid = await envd.processes.start(["cat"], stdin=True, tag=_tag())
    async with envd.processes.connect(pid) as proc:
        await envd.processes.send_stdin(pid, b"ping\n")
        async for event in proc:
            if event == Stdout(b"ping\n"):
                break
        await envd.processes.close_stdin(pid)
        result = await proc.collect(1024)
    assert (result.pid, result.exit_code, result.error) == (pid, 0, None)


async def test_sigterm_ends_a_process(envd: Any) -> None:
    pid = await envd.processes.start(["sleep", "60"])
    async with envd.processes.connect(pid) as proc:
        await envd.processes.kill(pid, signal.SIGTERM)
        result = await proc.collect(0)
    assert result.exit_code != 0
    assert result.error
    await _wait_gone(envd, pid)


async def test_missing_processes_are_not_found(envd: Any) -> None:
    with pytest.raises(NotFound):
        await envd.processes.kill(4_000_000)
    with pytest.raises(NotFound):
        await envd.processes.send_stdin("no-such-tag", b"x")
    with pytest.raises(NotFound):
        async with envd.processes.connect(4_000_000):
            pass


async def test_bad_requests_are_refused_before_sending(envd: Any) -> None:
    with pytest.raises(InvalidArgument):
        await envd.processes.kill(1, signal.SIGHUP)
    with pytest.raises(InvalidArgument):
        await envd.processes.exec([])
    with pytest.raises(InvalidArgument):
        await envd.processes.exec("  ")
    with pytest.raises(InvalidArgument):
        await envd.processes.pty_resize(1, 0, 24)


async def test_pty_start_input_resize(envd: Any) -> None:
    async with envd.processes.pty_start(80, 24, cmd=["/bin/sh"]) as pty:
        await envd.processes.pty_resize(pty.pid, 100, 40)
        await envd.processes.pty_input(pty.pid, b"stty size; exit 5\n")
        output = b""
        async for event in pty:
            if isinstance(event, PtyOutput):
                output += event.data
            elif isinstance(event, Exited):
                assert event.exit_code == 5
    assert b"40 100" in output


async def test_stream_survives_quiet_periods_with_keepalives(agent: Any, connect: Any) -> None:
    # The client gives up on a stream silent for 3 keepalive intervals; the agent's keepalives must
    # keep a quiet process's stream open well past that.
    envd = connect(agent.url, keepalive_interval=1)
    result = await envd.processes.exec("sleep 4; echo done")
    assert result.stdout == b"done\n"


async def test_calls_reuse_one_kept_alive_connection(agent: Any) -> None:
    async with AsyncEnvdClient(EnvdConfig(base_url=agent.url)) as envd:
        pool = envd._channel.http._transport._pool  # httpx's connection pool
        seen = set()
        for _ in range(10):
            assert (await envd.processes.exec(["true"])).ok
            await envd.processes.list()
            async with envd.processes.exec_stream(["echo", "x"]) as proc:
                await proc.collect(10)
            seen.update(id(connection) for connection in pool.connections)
        assert len(seen) == 1, f"{len(seen)} connections for sequential calls"
