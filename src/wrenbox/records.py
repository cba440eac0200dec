"""The records wrenbox keeps about sandboxes and templates, and the sandbox state machine.

These are plain data: the store persists them, the manager changes them, the API renders them. The
transition table is the single statement of which lifecycle moves are legal.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import Any

from wrenbox.errors import Conflict, NotRunning

__all__ = [
    "SandboxRecord",
    "SandboxState",
    "TemplateRecord",
    "TemplateState",
    "check_transition",
]


class SandboxState(enum.StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    SNAPSHOTTING = "snapshotting"
    STOPPING = "stopping"
    ERROR = "error"
    DESTROYED = "destroyed"

    @property
    def transitional(self) -> bool:
        return self in _TRANSITIONAL

    @property
    def live(self) -> bool:
        """Counts against the sandbox limit (holds or is about to hold a VM)."""
        return self in {
            SandboxState.CREATING,
            SandboxState.RUNNING,
            SandboxState.PAUSING,
            SandboxState.RESUMING,
            SandboxState.SNAPSHOTTING,
        }


S = SandboxState
_TRANSITIONAL = {S.CREATING, S.PAUSING, S.RESUMING, S.SNAPSHOTTING, S.STOPPING}

# Legal moves. Failure paths are explicit: a failed pause goes back to running (the VM is continued),
# a failed resume goes back to paused (the snapshot is untouched), anything unrecoverable to error.
TRANSITIONS: dict[SandboxState, frozenset[SandboxState]] = {
    S.CREATING: frozenset({S.RUNNING, S.ERROR, S.DESTROYED}),
    # running → paused only in recovery: the VM was lost and the disk went back to the last pause.
    S.RUNNING: frozenset({S.PAUSING, S.PAUSED, S.SNAPSHOTTING, S.STOPPING, S.ERROR}),
    S.PAUSING: frozenset({S.PAUSED, S.RUNNING, S.ERROR}),
    S.PAUSED: frozenset({S.RESUMING, S.SNAPSHOTTING, S.STOPPING}),
    S.RESUMING: frozenset({S.RUNNING, S.PAUSED, S.ERROR}),
    S.SNAPSHOTTING: frozenset({S.PAUSED, S.RUNNING, S.ERROR}),
    S.STOPPING: frozenset({S.DESTROYED, S.ERROR}),
    S.ERROR: frozenset({S.STOPPING}),
    S.DESTROYED: frozenset(),
}


def check_transition(sandbox_id: str, current: SandboxState, target: SandboxState) -> None:
    """Raise a Conflict (NotRunning when it needs a running sandbox) if the move is not legal."""
    if target in TRANSITIONS[current]:
        return
    if current.transitional:
        raise Conflict(f"sandbox {sandbox_id} is {current.value}; try again when that has finished")
    if target is S.PAUSING:
        raise NotRunning(f"sandbox {sandbox_id} is {current.value}, not running")
    raise Conflict(f"sandbox {sandbox_id} is {current.value}; cannot move to {target.value}")


@dataclass(slots=True)
class SandboxRecord:
    """Everything wrenbox knows about one sandbox. ``resources`` names what it holds right now.

    ``resources`` is the crash-recovery ledger: every host resource (network slot, VM process, disk,
    page server, ...) is written here as soon as it is acquired, before it is used, so a restarted
    manager can find and reclaim or adopt it. Its keys belong to the manager.
    """

    id: str
    template: str
    state: SandboxState = SandboxState.CREATING
    vcpus: int = 1
    memory_mb: int = 512
    disk_mb: int | None = None
    timeout_s: int = 0  # the lifetime it was given (seconds; 0: none), counted again on every resume
    end_at: float | None = None  # when it times out (unix time) while it runs; None: never
    on_timeout: str = "pause"
    metadata: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    last_active_at: float = field(default_factory=time.time)
    state_changed_at: float = field(default_factory=time.time)
    host_ip: str | None = None
    resources: dict[str, Any] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)
    error: str | None = None
    pause_failures: int = 0
    access_token: str | None = None  # the guest agent's token (X-Access-Token), set at first /init
    team: str | None = None  # who owns it (the API's tenant); None: made in-process, no tenant
    pause_memory: bool = True  # a timeout's pause keeps memory (False: disk only, boots on resume)
    auto_resume: bool = False  # traffic through the proxy resumes it when paused
    # Its outbound traffic rules: {"allow": [CIDR...], "deny": [CIDR...]} (allow wins over deny; the
    # host's default-deny ranges apply after both). Kept across pauses, applied to every slot it gets.
    egress: dict[str, list[str]] = field(default_factory=dict)

    def replace(self, **changes: Any) -> SandboxRecord:
        return dataclasses.replace(self, **changes)


class TemplateState(enum.StrEnum):
    BUILDING = "building"
    READY = "ready"
    DELETING = "deleting"


@dataclass(slots=True)
class TemplateRecord:
    """A template: a pre-booted snapshot that sandboxes are restored from. Immutable once ``ready``."""

    name: str
    kind: str  # "base" (booted from an image) or "snapshot" (made from a sandbox)
    path: str
    vcpus: int = 1
    memory_mb: int = 512
    disk_mb: int | None = None  # its root disk (sandboxes from it get the same); None: not known yet
    state: TemplateState = TemplateState.BUILDING
    source: str | None = None  # image name or sandbox id it was made from
    parent: str | None = None  # template whose disk/memory this one builds on, if chained
    size_bytes: int = 0
    created_at: float = field(default_factory=time.time)
    manifest: dict[str, Any] = field(default_factory=dict)
    team: str | None = None  # who owns it; None: every team may use it (built by the operator)
