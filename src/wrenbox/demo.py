"""``wrenbox demo``: the whole lifecycle once, in-process, timing each step.

create → exec (and a background counter) → write a file → pause → resume → verify → snapshot into a
template → create from it (the file is there) → fork that sandbox (the file is there too) → destroy
everything, and check that nothing is left.

``verify`` proves what it says: the file is read back from the guest's disk after its page cache is
dropped (not from memory the snapshot kept), the counter is the same process (same PID) and has kept
counting since the resume.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from wrenbox.config import Settings
from wrenbox.errors import WrenboxError
from wrenbox.manager import CreateRequest, Sandboxes
from wrenbox.service import ensure_template, open_manager

__all__ = ["STEPS", "DemoStep", "run_demo"]

STEPS = (
    "create",
    "exec",
    "write_file",
    "pause",
    "resume",
    "verify",
    "snapshot",
    "create_from_snapshot",
    "fork",
    "destroy",
)
# Written then renamed: a reader never catches the file empty between truncate and write.
COUNTER = (
    "i=0; while true; do i=$((i+1)); echo $i > /dev/shm/counter.new; "
    "mv /dev/shm/counter.new /dev/shm/counter; sleep 0.2; done"
)
DEMO_FILE = "/home/user/demo.txt"


@dataclass(frozen=True, slots=True)
class DemoStep:
    step: str
    seconds: float
    ok: bool
    detail: str = ""


class DemoFailed(WrenboxError):
    pass


async def run_demo(
    settings: Settings,
    report: Callable[[DemoStep], None],
    progress: Callable[[str], None] | None = None,
) -> bool:
    """Run every step of :data:`STEPS`, calling ``report`` after each; stops at the first failure."""
    async with open_manager(settings, reaper=False) as mgr:
        await ensure_template(mgr, settings, settings.defaults.template, on_step=progress)
        demo = _Demo(mgr, report)
        try:
            await demo.run()
        except Exception as exc:
            report(DemoStep(demo.current, round(time.monotonic() - demo.started, 3), False, str(exc)))
            await demo.cleanup()
            return False
        return True


class _Demo:
    def __init__(self, mgr: Sandboxes, report: Callable[[DemoStep], None]) -> None:
        self.mgr = mgr
        self.report = report
        self.current = ""
        self.started = 0.0
        self.sandboxes: list[str] = []
        self.template: str | None = None

    @asynccontextmanager
    async def step(self, name: str) -> AsyncIterator[None]:
        self.current, self.started = name, time.monotonic()
        yield
        self.report(DemoStep(name, round(time.monotonic() - self.started, 3), True))

    async def run(self) -> None:
        mgr = self.mgr
        content = secrets.token_hex(4096).encode()
        async with self.step("create"):
            sb = await mgr.create(CreateRequest(metadata={"purpose": "demo"}))
            self.sandboxes.append(sb.id)
        async with self.step("exec"):
            result = await mgr.exec(sb.id, "echo hello from $(hostname)")
            _check(result.exit_code == 0 and b"hello" in result.stdout, f"exec said {result!r}")
            async with mgr.use(sb.id) as envd:
                counter_pid = await envd.processes.start(COUNTER, tag="counter")
        async with self.step("write_file"), mgr.use(sb.id) as envd:
            await envd.files.upload(DEMO_FILE, content)
        before = await self._counter(sb.id)
        async with self.step("pause"):
            await mgr.pause(sb.id)
        async with self.step("resume"):
            await mgr.resume(sb.id)
        async with self.step("verify"):
            await self._check_file(sb.id, content, from_disk=True)
            async with mgr.use(sb.id) as envd:
                pids = {p.tag: p.pid for p in await envd.processes.list()}
            _check(
                pids.get("counter") == counter_pid,
                f"the counter (pid {counter_pid}) is not the process it was: {pids}",
            )
            resumed = await self._counter(sb.id)
            await anyio.sleep(0.5)
            after = await self._counter(sb.id)
            _check(
                before <= resumed < after,
                f"the counter did not go on counting ({before}, {resumed}, {after})",
            )
        self.template = f"demo-{sb.id[:8]}"
        async with self.step("snapshot"):
            await mgr.snapshot(sb.id, self.template)
        async with self.step("create_from_snapshot"):
            child = await mgr.create(CreateRequest(template=self.template))
            self.sandboxes.append(child.id)
            await self._check_file(child.id, content)
        async with self.step("fork"):
            forks = await mgr.fork(child.id, count=1)
            self.sandboxes += [f.id for f in forks]
            await self._check_file(forks[0].id, content)
        async with self.step("destroy"):
            made = list(self.sandboxes)
            await self.cleanup()
            left = [r.id for r in mgr.list() if r.id in made]
            _check(not left, f"sandboxes still there after destroy: {left}")
            names = [t.name for t in mgr.templates()]
            _check(f"demo-{sb.id[:8]}" not in names, "the demo's template is still there after destroy")

    async def cleanup(self) -> None:
        with anyio.CancelScope(shield=True):
            for sid in reversed(self.sandboxes):
                await self.mgr.destroy(sid)
            self.sandboxes.clear()
            if self.template is not None:
                await self.mgr.delete_template(self.template)
                self.template = None

    async def _check_file(self, sandbox_id: str, content: bytes, *, from_disk: bool = False) -> None:
        if from_disk:  # drop the page cache, so the read goes to the disk
            dropped = await self.mgr.exec(
                sandbox_id, "sync && echo 3 > /proc/sys/vm/drop_caches", user="root"
            )
            _check(dropped.exit_code == 0, f"could not drop the guest's caches: {dropped.stderr!r}")
        result = await self.mgr.exec(sandbox_id, f"sha256sum {DEMO_FILE}")
        want = hashlib.sha256(content).hexdigest()
        _check(result.stdout.decode().split()[:1] == [want], f"{DEMO_FILE} differs: {result.stdout!r}")

    async def _counter(self, sandbox_id: str) -> int:
        result = await self.mgr.exec(sandbox_id, "cat /dev/shm/counter")
        return int(result.stdout.strip() or 0)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise DemoFailed(message)
