"""Starting the agent exactly as documented, and keeping it lean enough for a TCG guest."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import start_agent

SDK_SCRIPT = """
from e2b import Sandbox
box = Sandbox.create()  # E2B_DEBUG=true: envd at http://localhost:49983, no API server
result = box.commands.run("echo from-the-sdk")
box.files.write("{path}", "written")
print(result.stdout.strip(), box.files.read("{path}"))
"""


def _wait_for_free_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
        time.sleep(0.5)


@pytest.mark.parametrize("http_version", [None, "1.1"], ids=["sdk-default", "E2B_HTTP_VERSION=1.1"])
def test_documented_command_line_with_sdk_debug_mode(tmp_path: Path, http_version: str | None) -> None:
    if not _wait_for_free_port(49983, timeout=30):
        pytest.skip("port 49983 stayed busy (another agent runs on this machine)")
    agent = start_agent("127.0.0.1:49983", tmp_path / "agent.log", "--log-level", "debug")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
        env["E2B_DEBUG"] = "true"
        if http_version:
            env["E2B_HTTP_VERSION"] = http_version
        script = SDK_SCRIPT.format(path=tmp_path / "sdk.txt")
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["from-the-sdk", "written"]
        assert "POST /process.Process/Start HTTP/1.1" in agent.log()
    finally:
        agent.stop()


def test_port_zero_prints_the_bound_address(tmp_path: Path) -> None:
    first = start_agent("127.0.0.1:0", tmp_path / "a.log")
    second = start_agent("127.0.0.1:0", tmp_path / "b.log")
    try:
        assert first.port != second.port
        assert first.port > 0
    finally:
        first.stop()
        second.stop()


def test_bad_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "wrenbox.guest", "--listen", "nowhere"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "HOST:PORT" in done.stderr


def test_agent_imports_stay_lean() -> None:
    # Everything the agent ever loads (the RPC machinery included) and nothing of the host side.
    probe = (
        "import sys, json, wrenbox.guest.__main__, wrenbox.guest.server, wrenbox.guest.services,"
        " wrenbox.guest.watch, hypercorn.asyncio, hypercorn.config; print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(json.loads(done.stdout))
    forbidden = {
        "pydantic",
        "pydantic_settings",
        "httpx",
        "wrenbox.config",
        "typer",
        "rich",
        "e2b",
        "pyroute2",
    }
    assert not loaded & forbidden
    third_party = {m.split(".")[0] for m in loaded} - set(sys.stdlib_module_names) - {"_distutils_hack"}
    allowed = {
        "wrenbox",
        "connectrpc",
        "protobuf",
        "protobuf_ext",
        "hypercorn",
        "h11",
        "h2",
        "hpack",
        "hyperframe",
        "priority",
        "wsproto",
        "pyqwest",
        "typing_extensions",
        "__main__",
        "__mp_main__",  # multiprocessing (stdlib), imported by hypercorn
        "_cffi_backend",
    }
    assert third_party <= allowed, third_party - allowed
