"""The control plane of one host: the sandbox lifecycle users see, persisted and recoverable.

- :mod:`.manager` — :class:`SandboxManager`: policy, one lock per sandbox, admission, activity.
- :mod:`.recovery` — settling what a crash interrupted, at start.
- :mod:`.reaper` — pausing (or killing) sandboxes nobody used for their timeout.
- :mod:`.store` — SQLite: sandboxes, templates, events.
"""

from wrenbox.manager.manager import CreateRequest, ManagerConfig, SandboxManager

__all__ = ["CreateRequest", "ManagerConfig", "SandboxManager"]
