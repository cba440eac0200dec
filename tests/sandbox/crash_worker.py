"""A manager in a process of its own, for crash tests: it runs a short lifecycle script and is killed
(by itself, with SIGKILL) at a fault point of the script's last op.

    python -m tests.sandbox.crash_worker '<settings json>' <point> <sandbox id> <op> [<op> ...]

Ops: ``create``, ``pause``, ``resume``, ``destroy``, ``snapshot:<name>``, ``fork:<count>``,
``write:<seed>`` (the two files of ``guest.Contents.seeded(seed)``), ``exec:<shell command>``, and
``die`` (SIGKILL now: the manager is gone, its VMs are not). The point (``-`` for none) is armed for the
last op only, so the ops before it reach the same points unharmed. Each completed op is printed, so a
test can tell where the kill came.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import anyio

from wrenbox import faults
from wrenbox.config import Settings
from wrenbox.manager import CreateRequest, SandboxManager
from wrenbox.service import open_manager

from .guest import Contents

REPO = Path(__file__).resolve().parents[2]


async def step(mgr: SandboxManager, sandbox_id: str, op: str) -> None:
    name, _, arg = op.partition(":")
    if name == "create":
        await mgr.create(CreateRequest(sandbox_id=sandbox_id, metadata={"crash": "test"}))
    elif name == "pause":
        await mgr.pause(sandbox_id)
    elif name == "resume":
        await mgr.resume(sandbox_id)
    elif name == "destroy":
        await mgr.destroy(sandbox_id)
    elif name == "snapshot":
        await mgr.snapshot(sandbox_id, arg)
    elif name == "fork":
        await mgr.fork(sandbox_id, count=int(arg))
    elif name == "write":
        await Contents.seeded(arg).write(mgr, sandbox_id)
    elif name == "exec":
        result = await mgr.exec(sandbox_id, arg, user="root")
        if result.exit_code != 0:
            raise SystemExit(f"{op!r} failed: {result.stderr!r}")
    elif name == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        raise SystemExit(f"unknown op {op!r}")


async def main(settings: Settings, point: str, sandbox_id: str, ops: list[str]) -> None:
    async with open_manager(settings, reaper=False) as mgr:
        for i, op in enumerate(ops):
            last = i == len(ops) - 1
            with faults.armed(point, "crash") if last and point != "-" else nullcontext():
                await step(mgr, sandbox_id, op)
            print(f"done {op}", flush=True)


def crash(settings: Settings, point: str, sandbox_id: str, *ops: str) -> None:
    """Run ``ops`` in a worker process that kills itself at ``point`` during the last op (or at a final
    ``die``). Fails unless the worker died by SIGKILL in the last op, every op before it done."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.sandbox.crash_worker",
            settings.model_dump_json(),
            point,
            sandbox_id,
            *ops,
        ],
        cwd=REPO,
        capture_output=True,
        timeout=300,
        check=False,
    )
    stderr = done.stderr.decode()[-3000:]
    assert done.returncode == -9, f"the worker was not killed at {point} (exit {done.returncode}):\n{stderr}"
    completed = [line.removeprefix("done ") for line in done.stdout.decode().splitlines()]
    assert completed == list(ops[:-1]), f"killed before the last op:\n{stderr}"


if __name__ == "__main__":
    anyio.run(main, Settings.model_validate_json(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:])
