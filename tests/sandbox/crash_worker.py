"""A manager in a process of its own, for crash tests: it runs a short lifecycle script and is killed
(by itself, with SIGKILL) at the fault point named in ``WRENBOX_FAULTS=<point>=crash``.

    python -m tests.sandbox.crash_worker '<settings json>' <sandbox id> <op> [<op> ...]

Ops: ``create``, ``pause``, ``resume``, ``snapshot:<name>``, ``fork``, ``exec:<shell command>``, and
``die`` (SIGKILL now: the manager is gone, its VMs are not). Each completed op is printed, so a test can
tell a crash (exit -9 before the last line) from a script that ran through.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio

from wrenbox.config import Settings
from wrenbox.manager import CreateRequest
from wrenbox.service import open_manager

REPO = Path(__file__).resolve().parents[2]


async def main(settings: Settings, sandbox_id: str, ops: list[str]) -> None:
    async with open_manager(settings, reaper=False) as mgr:
        for op in ops:
            if op == "create":
                await mgr.create(CreateRequest(sandbox_id=sandbox_id, metadata={"crash": "test"}))
            elif op == "pause":
                await mgr.pause(sandbox_id)
            elif op == "resume":
                await mgr.resume(sandbox_id)
            elif op.startswith("snapshot:"):
                await mgr.snapshot(sandbox_id, op.split(":", 1)[1])
            elif op == "fork":
                await mgr.fork(sandbox_id, count=1)
            elif op.startswith("exec:"):
                result = await mgr.exec(sandbox_id, op.split(":", 1)[1])
                if result.exit_code != 0:
                    raise SystemExit(f"{op!r} failed: {result.stderr!r}")
            elif op == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                raise SystemExit(f"unknown op {op!r}")
            print(f"done {op}", flush=True)


def crash(settings: Settings, point: str, sandbox_id: str, *ops: str) -> list[str]:
    """Run ``ops`` in a worker process that kills itself at ``point`` (or at a ``die`` op); return the
    ops it completed. Fails unless the worker really died by SIGKILL."""
    env = {**os.environ, "WRENBOX_FAULTS": f"{point}=crash"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.sandbox.crash_worker", settings.model_dump_json(), sandbox_id, *ops],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == -9, (
        f"the worker was not killed at {point} (exit {done.returncode}):\n{done.stderr.decode()[-3000:]}"
    )
    return done.stdout.decode().split()[1::2]


if __name__ == "__main__":
    anyio.run(main, Settings.model_validate_json(sys.argv[1]), sys.argv[2], sys.argv[3:])
