"""The official e2b SDK runs commands through our agent, over HTTP/2 and HTTP/1.1."""

from __future__ import annotations

import time

import pytest
from e2b import CommandExitException, Sandbox
from e2b.exceptions import TimeoutException

from .conftest import RunningAgent, force_h2c


def test_foreground_command_with_env_and_cwd(sandbox: Sandbox, workdir) -> None:
    result = sandbox.commands.run(
        'echo "$GREETING"; pwd; echo oops >&2', envs={"GREETING": "hi there"}, cwd=str(workdir)
    )
    assert result.exit_code == 0
    assert result.stdout == f"hi there\n{workdir}\n"
    assert result.stderr == "oops\n"


def test_nonzero_exit_raises(sandbox: Sandbox) -> None:
    with pytest.raises(CommandExitException) as caught:
        sandbox.commands.run("echo partial; exit 7")
    assert caught.value.exit_code == 7
    assert caught.value.stdout == "partial\n"
    assert caught.value.error == "exit status 7"


def test_output_callbacks_stream_in_order(sandbox: Sandbox) -> None:
    seen: list[str] = []
    sandbox.commands.run("for i in 1 2 3; do echo $i; sleep 0.05; done", on_stdout=seen.append)
    assert "".join(seen) == "1\n2\n3\n"


def test_background_then_connect_by_pid(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("echo started; sleep 0.5; echo done", background=True)
    assert handle.pid in [p.pid for p in sandbox.commands.list()]
    handle.disconnect()
    again = sandbox.commands.connect(handle.pid)
    result = again.wait()
    # The reattached stream replays what the process printed before, then follows it.
    assert result.stdout == "started\ndone\n"
    assert result.exit_code == 0


def test_stdin_send_and_close(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("cat; echo end", background=True, stdin=True)
    handle.send_stdin("line one\n")
    sandbox.commands.send_stdin(handle.pid, b"line two\n")
    handle.close_stdin()
    assert handle.wait().stdout == "line one\nline two\nend\n"


def test_stream_input(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("wc -c", background=True, stdin=True)
    sandbox.commands.stream_input(handle.pid, [b"abc", "def", b"\n"])
    handle.close_stdin()
    assert handle.wait().stdout.strip() == "7"


def test_kill_background_command(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 60", background=True)
    assert sandbox.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as caught:
        handle.wait()
    assert caught.value.error == "signal: killed"
    assert handle.pid not in [p.pid for p in sandbox.commands.list()]
    assert sandbox.commands.kill(handle.pid) is False  # already gone: the SDK's not-found answer


def test_timeout_ends_the_stream_not_the_process(sandbox: Sandbox) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30", timeout=0.5)
    assert time.monotonic() - started < 10
    running = [p for p in sandbox.commands.list() if p.args[-1] == "sleep 30"]
    assert len(running) == 1, "the command must survive its client's deadline"
    assert sandbox.commands.kill(running[0].pid)


def test_both_http_versions_are_really_used(agent: RunningAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    Sandbox.create(debug=True, sandbox_url=agent.url, http_version="1.1").commands.run("true")
    force_h2c(monkeypatch)
    Sandbox.create(debug=True, sandbox_url=agent.url).commands.run("true")
    log = agent.log()
    assert "POST /process.Process/Start HTTP/2" in log
    assert "POST /process.Process/Start HTTP/1.1" in log
