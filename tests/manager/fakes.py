"""A fake Runtime for the manager's policy tests: it keeps 'host resources' in a set so tests can see
exactly what is held, and passes the same fault points the real runtime does."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio

from wrenbox import faults
from wrenbox.errors import Unavailable
from wrenbox.ledger import Ledger
from wrenbox.records import SandboxRecord, TemplateRecord, TemplateState
from wrenbox.runtime.base import Inspection


@dataclass
class FakeMetrics:
    cpu_count: int = 1
    mem_used: int = 123


class FakeStream:
    def __init__(self, cmd: str) -> None:
        self.events = ["started", f"stdout:{cmd}", "exited:0"]

    async def __aenter__(self) -> FakeStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __aiter__(self) -> AsyncIterator[str]:
        async def gen() -> AsyncIterator[str]:
            for e in self.events:
                yield e

        return gen()


class FakeEnvd:
    def __init__(self) -> None:
        self.block = anyio.Event()
        self.blocked = anyio.Event()
        self.calls: list[str] = []

    @property
    def processes(self) -> FakeEnvd:  # the real client groups process calls under .processes
        return self

    def exec_stream(self, cmd: str, **kwargs: Any) -> FakeStream:
        return FakeStream(cmd)

    async def metrics(self) -> FakeMetrics:
        return FakeMetrics()

    async def exec(self, cmd: str, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(cmd)
        if cmd == "block":
            self.blocked.set()
            await self.block.wait()
        return {"stdout": f"ran {cmd}", "output_cap": kwargs.get("output_cap")}


class FakeRuntime:
    """Implements :class:`wrenbox.runtime.base.Runtime` (``tests/manager/test_seams.py`` holds it to
    that, signature by signature)."""

    def __init__(self) -> None:
        self.held: set[str] = set()  # what exists on the "host"
        self.templates: set[str] = set()  # template files on the "host", besides "minimal"
        self.failing_release: set[str] = set()
        self.envd_client = FakeEnvd()
        self.stopped: set[str] = set()  # sandboxes whose VM exists with its vCPUs stopped
        self.committed: set[str] = set()  # sandboxes whose last pause reached its commit
        self.revertible_ids: set[str] = set()  # sandboxes whose disk can go back to their snapshot
        self.pauses: list[tuple[str, bool]] = []  # (sandbox, with memory)
        self.resumes: list[tuple[str, bool]] = []
        self.egress: dict[str, dict[str, list[str]]] = {}  # what each running sandbox's slot enforces
        self.failing_egress = False
        self.snapshot_bytes = 1000  # what a paused sandbox's snapshot occupies on disk (plus 100 of disk)
        self.agents_restarted: set[str] = set()  # sandboxes whose agent lost its state
        self.agent_inits: list[str] = []
        self.host_damage: list[str] = []  # what repair_host finds removed (and puts back)
        self._exits, self._exited = anyio.create_memory_object_stream[str](math.inf)
        self._ips = 0

    def kill_vm(self, sandbox_id: str) -> None:
        """The VM dies on its own (as an OOM kill would): gone, and reported to watch_vms."""
        self.held.discard(f"{sandbox_id}:vm")
        self.stopped.discard(sandbox_id)
        self._exits.send_nowait(sandbox_id)

    def _acquire(self, ledger: Ledger, key: str, op: str) -> None:
        ledger.hold(key, f"{ledger.rec.id}:{key}")
        faults.point(f"{op}.{key}")
        self.held.add(f"{ledger.rec.id}:{key}")

    def _ip(self) -> str:
        self._ips += 1
        return f"10.11.0.{self._ips}"

    def _record(self, name: str, **fields: Any) -> TemplateRecord:
        defaults: dict[str, Any] = {
            "kind": "base",
            "vcpus": 1,
            "memory_mb": 256,
            "state": TemplateState.READY,
        }
        return TemplateRecord(name=name, path=f"/t/{name}", **(defaults | fields))

    async def start(self, rec: SandboxRecord, template: TemplateRecord, ledger: Ledger, *, cold: bool) -> str:
        for key in ("slot", "disk", "vm"):
            self._acquire(ledger, key, "create")
        faults.point("create.init")
        return self._ip()

    async def pause(self, rec: SandboxRecord, ledger: Ledger, *, memory: bool) -> None:
        if f"{rec.id}:vm" not in self.held:
            raise Unavailable("QEMU went away during 'stop'")
        faults.point("pause.stop")
        ledger.hold("snapshot", f"{rec.id}:snapshot")
        self.held.add(f"{rec.id}:snapshot")
        faults.point("pause.memory")
        self.committed.add(rec.id)
        self.pauses.append((rec.id, memory))
        for key in ("vm", "slot"):
            await ledger.release(key)

    async def resume(self, rec: SandboxRecord, ledger: Ledger, *, memory: bool) -> str:
        for key in ("slot", "vm"):
            self._acquire(ledger, key, "resume")
        faults.point("resume.init")
        self.resumes.append((rec.id, memory))
        return self._ip()

    async def set_egress(self, rec: SandboxRecord) -> None:
        if self.failing_egress:
            raise RuntimeError("nft failed")
        self.egress[rec.id] = rec.egress

    async def snapshot(self, rec: SandboxRecord, name: str, ledger: Ledger) -> TemplateRecord:
        faults.point("snapshot.write")
        self.templates.add(name)
        return self._record(name, kind="snapshot", size_bytes=1234, source=rec.id, parent=rec.template)

    async def release(self, rec: SandboxRecord, key: str, value: Any) -> None:
        if key in self.failing_release:
            raise OSError(f"{key} is busy")
        self.held.discard(value)

    def envd(self, rec: SandboxRecord) -> FakeEnvd:  # type: ignore[override]
        return self.envd_client

    def usage(self, rec: SandboxRecord) -> dict[str, int | float]:
        out: dict[str, int | float] = {"resources": len(rec.resources)}
        if "snapshot" in rec.resources:
            out |= {"disk_bytes": 100, "snapshot_bytes": self.snapshot_bytes}
        return out

    def list_templates(self) -> list[TemplateRecord]:
        return [self._record(t) for t in ["minimal", *sorted(self.templates)]]

    async def build_template(
        self,
        name: str,
        *,
        image: str,
        vcpus: int,
        memory_mb: int,
        disk_mb: int,
        on_step: Callable[[str], None] | None = None,
    ) -> TemplateRecord:
        for step in ("boot", "snapshot"):
            faults.point(f"build.{step}")
            if on_step is not None:
                on_step(step)
        self.templates.add(name)
        return self._record(name, source=image, size_bytes=4321, disk_mb=disk_mb)

    async def delete_template(self, name: str) -> None:
        self.templates.discard(name)

    async def inspect(self, rec: SandboxRecord) -> Inspection:
        alive = f"{rec.id}:vm" in self.held
        vm = "gone" if not alive else "paused" if rec.id in self.stopped else "running"
        return Inspection(
            vm=vm,  # type: ignore[arg-type]
            pause_committed=rec.id in self.committed,
            revertible=rec.id in self.revertible_ids,
            exited="vm" in rec.resources and not alive,
        )

    async def continue_vm(self, rec: SandboxRecord) -> None:
        self.stopped.discard(rec.id)

    async def finish_resume(self, rec: SandboxRecord) -> str:
        return self._ip()

    async def sweep(self, records: list[SandboxRecord]) -> dict[str, list[str]]:
        named = {v for r in records for v in r.resources.values()}
        stray = sorted(self.held - named)
        self.held -= set(stray)
        return {"things": stray}

    async def watch_vms(self, lost: Callable[[str], Awaitable[None]]) -> None:
        async with anyio.create_task_group() as tg:
            async for sandbox_id in self._exited:
                tg.start_soon(lost, sandbox_id)

    async def check_agent(self, rec: SandboxRecord) -> bool:
        if rec.id not in self.agents_restarted:
            return False
        self.agents_restarted.discard(rec.id)
        self.agent_inits.append(rec.id)
        return True

    async def repair_host(self) -> list[str]:
        repaired, self.host_damage = self.host_damage, []
        return repaired
