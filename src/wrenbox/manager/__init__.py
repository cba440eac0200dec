"""The control plane of one host: the sandbox lifecycle users see, persisted and recoverable.

Callers use :class:`Sandboxes` (the face) and nothing else; :class:`SandboxManager` implements it.

- :mod:`.sandboxes` — the face: :class:`Sandboxes`, :class:`CreateRequest`, :class:`Address`.
- :mod:`.manager` — :class:`SandboxManager`: policy, one lock per sandbox, tenancy, activity.
- :mod:`.admission` — whether a sandbox may start now: the host's limits (count, memory, RAM files).
- :mod:`.quotas` — what each team may hold: live, starting and paused sandboxes, templates, bytes.
- :mod:`.catalog` — template rows: the one road templates take into and out of the store.
- :mod:`.recovery` — settling what a crash interrupted, at start.
- :mod:`.reaper` — pausing (or killing) sandboxes at their end.
- :mod:`.store` — SQLite: sandboxes, templates, events.

It reaches the host only through :class:`wrenbox.runtime.base.Runtime`.
"""

from wrenbox.manager.manager import ManagerConfig, SandboxManager
from wrenbox.manager.sandboxes import Address, CreateRequest, Egress, Sandboxes, SandboxMetrics

__all__ = [
    "Address",
    "CreateRequest",
    "Egress",
    "ManagerConfig",
    "SandboxManager",
    "SandboxMetrics",
    "Sandboxes",
]
