"""``wrenbox sandbox ...`` as a client of the real server: every command, its JSON, its exit codes, and
an interactive shell in a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from fcntl import ioctl

import pytest
from typer.testing import CliRunner, Result

from wrenbox.cli import app

from .conftest import TEMPLATE, Server, server_env

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def cli(server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.setenv("WRENBOX_URL", server.url)
    monkeypatch.setenv("WRENBOX_API_KEY", server.key())
    yield CliRunner()
    with server.http() as http:
        for sb in http.get("/v2/sandboxes").json():
            http.delete(f"/sandboxes/{sb['sandboxID']}")


def run(cli: CliRunner, *args: str) -> Result:
    return cli.invoke(app, ["sandbox", *args])


def ok_json(cli: CliRunner, *args: str) -> object:
    result = run(cli, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_sandbox_commands(cli: CliRunner) -> None:
    made = ok_json(cli, "create", "-t", TEMPLATE, "-m", "owner=cli", "-e", "WHO=cli-test", "--timeout", "600")
    assert isinstance(made, dict)
    sid = made["sandboxID"]
    listed = ok_json(cli, "list", "-m", "owner=cli")
    assert [s["sandboxID"] for s in listed] == [sid]  # type: ignore[union-attr]
    assert ok_json(cli, "info", sid)["metadata"] == {"owner": "cli"}  # type: ignore[index]
    assert sid in run(cli, "list").stdout

    ran = run(cli, "exec", sid, "--", "sh", "-c", "echo $WHO; echo oops >&2; exit 7")
    assert (ran.exit_code, ran.stdout, ran.stderr) == (7, "cli-test\n", "oops\n")
    assert run(cli, "exec", sid, "--", "true").exit_code == 0

    assert run(cli, "pause", sid).exit_code == 0
    assert ok_json(cli, "info", sid)["state"] == "paused"  # type: ignore[index]
    assert ok_json(cli, "list", "--state", "running") == []
    assert ok_json(cli, "resume", sid)["sandboxID"] == sid  # type: ignore[index]
    assert run(cli, "exec", sid, "--", "cat", "/proc/uptime").exit_code == 0

    snap = ok_json(cli, "snapshot", sid, "--name", "cli-snap")
    assert snap["snapshotID"] == "cli-snap:default"  # type: ignore[index]
    forks = ok_json(cli, "fork", sid, "-n", "2")
    assert len(forks) == 2  # type: ignore[arg-type]
    kinds = [e["message"].split()[0] for e in ok_json(cli, "logs", sid)]  # type: ignore[union-attr]
    assert {"running", "paused"} <= set(kinds)
    metrics = run(cli, "metrics", sid)
    assert metrics.exit_code == 0, metrics.output

    assert run(cli, "kill", sid).exit_code == 0
    assert run(cli, "info", sid).exit_code == 4
    for child in forks:  # type: ignore[union-attr]
        assert run(cli, "kill", child["sandboxID"]).exit_code == 0
    with pytest.MonkeyPatch.context():
        assert cli.invoke(app, ["sandbox", "list"], env={"WRENBOX_URL": "http://127.0.0.1:9"}).exit_code == 5


def test_bad_input_and_unknown_sandboxes(cli: CliRunner) -> None:
    assert run(cli, "create", "-m", "no-equals-sign").exit_code == 2
    assert run(cli, "create", "-t", "nosuch").exit_code == 4
    assert run(cli, "exec", "nosuchsandbox", "--", "true").exit_code == 4
    assert run(cli, "pause", "nosuchsandbox").exit_code == 4
    bad_key = cli.invoke(app, ["sandbox", "list"], env={"WRENBOX_API_KEY": "e2b_" + "0" * 40})
    assert bad_key.exit_code == 1
    assert "invalid API key" in bad_key.stderr


def test_a_local_cli_makes_its_own_key(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WRENBOX_API_KEY", raising=False)
    monkeypatch.setenv("WRENBOX_URL", server.url)
    monkeypatch.setenv("WRENBOX_DATA_DIR", str(server.settings.data_dir))
    key_file = server.settings.data_dir / "cli.key"
    key_file.unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["sandbox", "list", "--json"])
    assert result.exit_code == 0, result.output
    assert key_file.stat().st_mode & 0o777 == 0o600
    again = CliRunner().invoke(app, ["sandbox", "list", "--json"])
    assert again.exit_code == 0
    assert key_file.read_text().startswith("e2b_")


def _read_until(fd: int, wanted: bytes, timeout: float = 30) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"never saw {wanted!r}; got {seen[-2000:]!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_an_interactive_shell_in_a_real_terminal(server: Server, cli: CliRunner) -> None:
    sid = ok_json(cli, "create", "-t", TEMPLATE)["sandboxID"]  # type: ignore[index]
    master, slave = pty.openpty()
    ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    env = server_env(server.settings) | {"WRENBOX_URL": server.url, "WRENBOX_API_KEY": server.key()}
    shell = subprocess.Popen(
        [sys.executable, "-c", "from wrenbox.cli import main; main()", "sandbox", "shell", sid],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    try:
        _read_until(master, b"$ ")  # the prompt: typing ahead of it may be flushed by readline
        os.write(master, b"stty size; echo marker-$((6*7))\r")
        assert b"30 100" in _read_until(master, b"marker-42")
        # A resize of the local terminal reaches the sandbox's.
        ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        shell.send_signal(signal.SIGWINCH)
        time.sleep(1)
        os.write(master, b"stty size; echo marker-$((7*7))\r")
        assert b"40 120" in _read_until(master, b"marker-49")
        # Ctrl-C interrupts the sandbox's command, not the CLI.
        os.write(master, b"sleep 30\r")
        time.sleep(1)
        os.write(master, b"\x03")
        os.write(master, b"echo after-$((8*8))\r")
        _read_until(master, b"after-64")
        os.write(master, b"exit 3\r")
        assert shell.wait(timeout=30) == 3
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()
        os.close(master)


def test_a_shell_reads_a_script_from_a_pipe(server: Server, cli: CliRunner) -> None:
    sid = ok_json(cli, "create", "-t", TEMPLATE)["sandboxID"]  # type: ignore[index]
    env = server_env(server.settings) | {"WRENBOX_URL": server.url, "WRENBOX_API_KEY": server.key()}
    done = subprocess.run(
        [sys.executable, "-c", "from wrenbox.cli import main; main()", "sandbox", "shell", sid],
        input=b"echo piped-$((2+3))\nexit 4\n",
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 4, done.stderr
    assert b"piped-5" in done.stdout
