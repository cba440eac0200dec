"""``wrenbox demo``: the whole lifecycle once, in-process, timing each step.

create → exec (and a background counter) → write a file → pause → resume → verify → snapshot into a
template → create from it (the file is there) → fork that sandbox (the file is there too) → destroy
everything, and check that nothing is left.

``verify`` proves what it says: the file is read back from the guest's disk after its page cache is
dropped (not from memory the snapshot kept); the counter is the same process (its PID is listed, and is
the one that writes the count) and runs after the resume (two reads after it, strictly increasing, the
last past the count read before the pause). ``destroy`` checks that nothing of any sandbox is left on the
host: not its VMM process, network namespace, RAM file, disk or directory (as its ledger named them).
Every check runs inside its step, so a failure is reported under the step that made it.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

from wrenbox.config import Settings
from wrenbox.errors import WrenboxError
from wrenbox.manager import CreateRequest, Sandboxes
from wrenbox.network.netns import netns_exists
from wrenbox.pids import ProcessRef
from wrenbox.records import SandboxRecord
from wrenbox.runtime.base import Resource as R
from wrenbox.service import ensure_template, open_manager

__all__ = ["STEPS", "Demo", "DemoFailed", "DemoStep", "run_demo", "traces_of"]

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
# Its own PID and a count, written then renamed (a reader never catches the file empty between truncate
# and write): each read says which process counted. ``$$`` is the ``sh -c`` that envd started.
COUNTER = (
    "i=0; while true; do i=$((i+1)); echo $$ $i > /dev/shm/counter.new; "
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
        demo = Demo(mgr, report, settings.sandboxes_dir)
        try:
            await demo.run()
        except Exception as exc:
            report(DemoStep(demo.current, round(time.monotonic() - demo.started, 3), False, str(exc)))
            await demo.cleanup()
            return False
        return True


class Demo:
    def __init__(self, mgr: Sandboxes, report: Callable[[DemoStep], None], sandboxes_dir: Path) -> None:
        self.mgr = mgr
        self.sandboxes_dir = sandboxes_dir
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
        self.current = f"after {name}"  # all the work is in steps: nothing is blamed on the last one

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
        async with self.step("pause"):
            before = await self.counter(sb.id, counter_pid)
            await mgr.pause(sb.id)
        async with self.step("resume"):
            await mgr.resume(sb.id)
        async with self.step("verify"):
            await self.check_file(sb.id, content, from_disk=True)
            await self.check_counting(sb.id, counter_pid, before)
        self.template = f"demo-{sb.id[:8]}"
        async with self.step("snapshot"):
            await mgr.snapshot(sb.id, self.template)
        async with self.step("create_from_snapshot"):
            child = await mgr.create(CreateRequest(template=self.template))
            self.sandboxes.append(child.id)
            await self.check_file(child.id, content)
        async with self.step("fork"):
            forks = await mgr.fork(child.id, count=1)
            self.sandboxes += [f.id for f in forks]
            await self.check_file(forks[0].id, content)
        async with self.step("destroy"):
            held = [mgr.get(sid) for sid in self.sandboxes]  # what each holds, as its ledger says
            await self.cleanup()
            left = [r.id for r in mgr.list() if r.id in {h.id for h in held}]
            _check(not left, f"sandboxes still there after destroy: {left}")
            names = [t.name for t in mgr.templates()]
            _check(f"demo-{sb.id[:8]}" not in names, "the demo's template is still there after destroy")
            traces = [f"sandbox {r.id}: {t}" for r in held for t in traces_of(r, self.sandboxes_dir)]
            _check(not traces, f"left on the host after destroy: {traces}")

    async def cleanup(self) -> None:
        with anyio.CancelScope(shield=True):
            for sid in reversed(self.sandboxes):
                await self.mgr.destroy(sid)
            self.sandboxes.clear()
            if self.template is not None:
                await self.mgr.delete_template(self.template)
                self.template = None

    async def check_file(self, sandbox_id: str, content: bytes, *, from_disk: bool = False) -> None:
        """The demo file in the guest hashes as ``content`` does; ``from_disk``: read from the disk,
        the guest's page cache dropped first (not from memory a snapshot kept)."""
        drop = "sync && echo 3 > /proc/sys/vm/drop_caches && " if from_disk else ""
        result = await self.mgr.exec(sandbox_id, f"{drop}sha256sum {DEMO_FILE}", user="root")
        _check(result.exit_code == 0, f"could not hash {DEMO_FILE}: {result.stderr!r}")
        want = hashlib.sha256(content).hexdigest()
        _check(result.stdout.decode().split()[:1] == [want], f"{DEMO_FILE} differs: {result.stdout!r}")

    async def check_counting(self, sandbox_id: str, pid: int, before: int) -> None:
        """Process ``pid`` is still listed and counts after the resume: two reads after it, both by that
        PID, strictly increasing, and the last past ``before`` (read before the pause)."""
        async with self.mgr.use(sandbox_id) as envd:
            pids = [p.pid for p in await envd.processes.list()]
        _check(pid in pids, f"the counter (pid {pid}) is gone after the resume: {pids}")
        resumed = await self.counter(sandbox_id, pid)
        await anyio.sleep(0.5)  # two ticks and more
        after = await self.counter(sandbox_id, pid)
        _check(
            resumed < after and before < after,
            f"the counter did not go on counting after the resume ({before} before the pause, then "
            f"{resumed} and {after})",
        )

    async def counter(self, sandbox_id: str, pid: int) -> int:
        """The count, which must have been written by process ``pid``."""
        result = await self.mgr.exec(sandbox_id, "cat /dev/shm/counter")
        fields = result.stdout.split()
        _check(len(fields) == 2, f"the counter wrote {result.stdout!r}")
        _check(int(fields[0]) == pid, f"the counter file is written by pid {fields[0]}, not {pid}")
        return int(fields[1])


def traces_of(rec: SandboxRecord, sandboxes_dir: Path) -> list[str]:
    """What of sandbox ``rec`` is still on this host: its VMM process, network namespace, RAM file and
    disk as its ledger named them (``rec`` read while it ran), and its directory."""
    res = rec.resources
    if missing := {R.SLOT, R.DISK, R.MEMORY, R.VM} - set(res):
        return [f"its ledger names no {', '.join(sorted(missing))}: nothing to check that against"]
    vm, netns, ram = res[R.VM], res[R.SLOT]["netns"], Path(res[R.MEMORY])
    found = []
    if ProcessRef(vm["pid"], vm["start_time"]).alive():
        found.append(f"its VMM, pid {vm['pid']}")
    if netns_exists(netns):
        found.append(f"its network namespace {netns}")
    paths = [ram, Path(res[R.DISK]["path"]), Path(res[R.DISK]["store"]), sandboxes_dir / rec.id]
    found += [str(p) for p in dict.fromkeys(paths) if p.exists()]
    return found


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise DemoFailed(message)
