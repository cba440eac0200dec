"""The seam between the sandbox manager and the host: what the manager asks of a runtime.

The manager (:mod:`wrenbox.manager`) decides what may happen and records it; a runtime makes it happen on
some host — :class:`wrenbox.runtime.host.HostRuntime` with VMs, disks, network slots and memory
snapshots, or a fake in the manager's unit tests. Every method that acquires something records it in the
:class:`~wrenbox.ledger.Ledger` it is given, under a :class:`Resource` key, and ``release`` gives back
any one of those resources, so the same call serves rollback, destroy, pause and recovery after a crash.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from wrenbox.ledger import Ledger
from wrenbox.records import SandboxRecord, TemplateRecord

if TYPE_CHECKING:
    from wrenbox.envd import AsyncEnvdClient

__all__ = ["PERSISTENT", "Inspection", "Resource", "Runtime"]


class Resource(enum.StrEnum):
    """What a sandbox can hold on a host: the keys of its ``resources`` ledger, in the order a start
    acquires them."""

    SLOT = "slot"  # its network slot (namespace, tap, host IP)
    DISK = "disk"  # its copy-on-write root disk
    MEMORY = "memory"  # the file its guest RAM lives in while it runs (on tmpfs by default)
    VM = "vm"  # the VMM process (pid + start time; ``pause_token`` while a pause is being written)
    SNAPSHOT = "snapshot"  # its paused state: memory chain (unless paused disk-only) + device state
    CHECKPOINT = "checkpoint"  # the disk as the snapshot left it, kept while a resumed VM runs


PERSISTENT = frozenset({Resource.DISK, Resource.SNAPSHOT})
"""What a paused sandbox holds; everything else exists only while a VM runs."""


@dataclass(frozen=True, slots=True)
class Inspection:
    """What recovery needs to know about a sandbox's VM after a restart."""

    vm: Literal["running", "paused", "gone"]  # paused: the vCPUs are stopped
    pause_committed: bool  # the pause under way when wrenbox stopped had written its snapshot
    revertible: bool  # giving back what only a live VM holds leaves a consistent paused sandbox
    # The VMM process has ended (not merely stopped answering its monitor, which "gone" also covers):
    # what a live manager settles as lost without ending anything itself.
    exited: bool = False


class Runtime(Protocol):
    """Host mechanics. Each method records what it acquires in the ledger it is given."""

    async def start(self, rec: SandboxRecord, template: TemplateRecord, ledger: Ledger, *, cold: bool) -> str:
        """Bring up a VM for ``rec`` from ``template`` (restore, or boot its image when ``cold``); returns
        the sandbox's host IP."""
        ...

    async def pause(self, rec: SandboxRecord, ledger: Ledger, *, memory: bool) -> None:
        """Write the running sandbox to disk (its memory too, unless ``memory`` is false) and release the
        VM, its slot and everything else it ran on."""
        ...

    async def resume(self, rec: SandboxRecord, ledger: Ledger, *, memory: bool) -> str:
        """Bring a paused sandbox back (from its memory, or booted from its disk when it was paused
        without memory or ``memory`` is false); returns its new host IP. A damaged snapshot (its memory
        chain's or device state's checksum, or length, does not match) raises CorruptData before any VM
        runs on it: the sandbox stays paused with that error, its snapshot and disk untouched, and a
        resume without memory still boots its disk."""
        ...

    async def set_egress(self, rec: SandboxRecord) -> None:
        """Apply ``rec.egress`` to the running sandbox's network slot."""
        ...

    async def snapshot(self, rec: SandboxRecord, name: str, ledger: Ledger) -> TemplateRecord:
        """Publish sandbox ``rec`` as template ``name``; a running VM keeps running."""
        ...

    async def release(self, rec: SandboxRecord, key: str, value: Any) -> None:
        """Give back one resource recorded in ``rec.resources``; idempotent."""
        ...

    def envd(self, rec: SandboxRecord) -> AsyncEnvdClient:
        """The guest agent client of a running sandbox (one per sandbox)."""
        ...

    def usage(self, rec: SandboxRecord) -> dict[str, int | float]:
        """What the sandbox costs the host now (bytes, CPU seconds)."""
        ...

    # Templates (files; the manager owns their rows).

    def list_templates(self) -> list[TemplateRecord]:
        """The published templates on this host, described as records."""
        ...

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
        """Boot image ``image`` once, on a root disk of ``disk_mb`` (or the image's size if larger), and
        publish it as template ``name``."""
        ...

    async def delete_template(self, name: str) -> None:
        """Remove template ``name``'s files (idempotent)."""
        ...

    # Recovery after a restart (see wrenbox.manager.recovery).

    async def inspect(self, rec: SandboxRecord) -> Inspection: ...

    async def continue_vm(self, rec: SandboxRecord) -> None:
        """Continue a VM whose vCPUs are stopped."""
        ...

    async def finish_resume(self, rec: SandboxRecord) -> str:
        """Complete a resume whose VM is up (agent, ``/init``); returns the host IP."""
        ...

    async def sweep(self, records: list[SandboxRecord]) -> dict[str, list[str]]:
        """Remove everything on the host that no record names; say what went."""
        ...

    # Watching running sandboxes (see SandboxManager.watch_vms and check_host).

    async def watch_vms(self, lost: Callable[[str], Awaitable[None]]) -> None:
        """Call ``lost(sandbox_id)`` as soon as a sandbox's VM exits without the runtime ending it; runs
        until cancelled."""
        ...

    async def check_agent(self, rec: SandboxRecord) -> bool:
        """Initialise the running sandbox's guest agent again if it lost its state; True if it had to."""
        ...

    async def repair_host(self) -> list[str]:
        """Put back host-wide parts someone removed (the firewall table); names what was repaired."""
        ...
