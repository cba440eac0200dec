"""The seam between the sandbox manager and the host: what the manager asks of a runtime.

The manager (:mod:`wrenbox.manager`) decides what may happen and records it; a runtime makes it happen on
some host — :class:`wrenbox.runtime.host.HostRuntime` with QEMU, disks, network slots and memory
snapshots, or a fake in the manager's unit tests. Every method that acquires something records it in the
:class:`~wrenbox.ledger.Ledger` it is given, and ``release`` gives back any one of those resources, so the
same call serves rollback, destroy, pause and recovery after a crash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from wrenbox.ledger import Ledger
from wrenbox.records import SandboxRecord, TemplateRecord

__all__ = ["Runtime"]


class Runtime(Protocol):
    """Host mechanics. Each method records what it acquires in the ledger it is given."""

    async def start(self, rec: SandboxRecord, template: TemplateRecord, ledger: Ledger, *, cold: bool) -> str:
        """Bring up a VM for ``rec`` from ``template`` (restore, or boot its image when ``cold``)."""
        ...

    async def pause(self, rec: SandboxRecord, ledger: Ledger) -> None:
        """Write the running VM to disk and release the VM, its slot and everything else it ran on."""
        ...

    async def resume(self, rec: SandboxRecord, ledger: Ledger) -> str:
        """Bring a paused sandbox back; returns its new host IP."""
        ...

    async def snapshot(self, rec: SandboxRecord, dest: Path, ledger: Ledger) -> dict[str, Any]:
        """Write sandbox ``rec`` as a template into ``dest`` (atomically); a running VM keeps running."""
        ...

    async def release(self, rec: SandboxRecord, key: str, value: Any) -> None:
        """Give back one resource recorded in ``rec.resources``; idempotent."""
        ...

    async def delete_template(self, template: TemplateRecord) -> None: ...

    def envd(self, rec: SandboxRecord) -> Any:
        """The guest agent client of a running sandbox."""
        ...

    # Recovery after a restart (see wrenbox.manager.recovery).
    persistent: frozenset[str]  # resource keys a paused sandbox keeps

    async def vm_state(self, rec: SandboxRecord) -> str:
        """``running``, ``paused`` or ``gone``."""
        ...

    async def continue_vm(self, rec: SandboxRecord) -> None: ...

    def pause_committed(self, rec: SandboxRecord) -> bool: ...

    def revertible(self, rec: SandboxRecord) -> bool:
        """Whether releasing the VM's resources leaves a consistent paused sandbox (disk reverted)."""
        ...

    async def finish_resume(self, rec: SandboxRecord) -> str: ...

    async def sweep(self, records: list[SandboxRecord]) -> dict[str, list[str]]: ...

    def host_metrics(self, rec: SandboxRecord) -> dict[str, int | float]: ...

    def template_names(self) -> list[tuple[str, str, int, int]]:
        """Published templates: (name, path, vcpus, memory MiB)."""
        ...
