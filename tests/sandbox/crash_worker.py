"""A manager in a process of its own, for crash tests: it runs a short lifecycle script and is killed
(by itself, with SIGKILL) at the fault point named in ``WRENBOX_FAULTS=<point>=crash``.

    python -m tests.sandbox.crash_worker '<settings json>' <sandbox id> <op> [<op> ...]

Ops: ``create``, ``pause``, ``resume``, ``snapshot:<name>``, ``fork``. Each completed op is printed,
so a test can tell a crash (exit -9 before the last line) from a script that ran through.
"""

from __future__ import annotations

import sys

import anyio

from wrenbox.config import Settings
from wrenbox.manager import CreateRequest
from wrenbox.service import open_manager


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
            else:
                raise SystemExit(f"unknown op {op!r}")
            print(f"done {op}", flush=True)


if __name__ == "__main__":
    anyio.run(main, Settings.model_validate_json(sys.argv[1]), sys.argv[2], sys.argv[3:])
