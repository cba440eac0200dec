from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from wrenbox.command import arun, require_tool, run, spawn
from wrenbox.errors import CommandFailed, MissingTool, Timeout


def test_run_captures_output() -> None:
    done = run(["sh", "-c", "echo out; echo err >&2"])
    assert done.returncode == 0
    assert done.stdout == b"out\n"
    assert done.stderr == b"err\n"


def test_run_raises_with_stderr_on_failure() -> None:
    with pytest.raises(CommandFailed, match="exited 3: nope") as info:
        run(["sh", "-c", "echo nope >&2; exit 3"])
    assert info.value.returncode == 3


def test_run_without_check_returns_the_status() -> None:
    assert run(["false"], check=False).returncode == 1


def test_run_times_out() -> None:
    with pytest.raises(Timeout):
        run(["sleep", "5"], timeout=0.2)


def test_missing_program_names_its_package() -> None:
    with pytest.raises(MissingTool, match="'no-such-tool-xyz'"):
        run(["no-such-tool-xyz"])
    with pytest.raises(MissingTool, match="nftables"):
        require_tool("nft-does-not-exist", "nftables")


@pytest.mark.anyio
async def test_arun_mirrors_run() -> None:
    done = await arun(["cat"], input=b"hello")
    assert done.stdout == b"hello"
    with pytest.raises(CommandFailed):
        await arun(["sh", "-c", "exit 2"])
    with pytest.raises(Timeout):
        await arun(["sleep", "5"], timeout=0.2)


def test_spawn_detaches_logs_and_is_tracked(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    ref = spawn(["sh", "-c", "echo out; echo err >&2; read x; exec sleep 30"], log=log)
    try:
        assert ref.alive()
        assert os.getsid(ref.pid) == ref.pid  # its own session: survives us, signals do not reach it
        deadline = time.monotonic() + 5
        while log.read_bytes() != b"out\nerr\n" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log.read_bytes() == b"out\nerr\n"  # stdin is /dev/null, so `read` returned at once
    finally:
        ref.terminate(grace=1)
    assert not ref.alive()


def test_spawn_failure_is_reported() -> None:
    with pytest.raises(MissingTool):
        spawn(["no-such-tool-xyz"], log=os.devnull)
    with pytest.raises(CommandFailed, match="could not start"):
        spawn(["/nonexistent/prog"], log=os.devnull)
