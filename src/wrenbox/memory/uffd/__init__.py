"""The userfaultfd page server: a memory snapshot served lazily to a VM that Firecracker restores.

- :mod:`.server` — :class:`PageServer`: one per restored VM; accept the VMM's hand-off, answer faults
  and events, prefetch, stop cleanly in every state.
- :mod:`.handshake` — Firecracker's hand-off message (the regions, the uffd over ``SCM_RIGHTS``).
- :mod:`.pager` — the fault/event loop and prefetch on the uffd.
- :mod:`.source` — :class:`PageSource`: where pages come from; :class:`FileSource` for a raw memory file.
- :mod:`.chain_source` — :class:`ChainSource`: a memory snapshot chain (:mod:`wrenbox.memory.chain`) as
  a page source.
- :mod:`.abi` — the kernel's userfaultfd ioctls and structures, from ctypes.
"""

from wrenbox.memory.uffd.server import (
    Extent,
    FileSource,
    GuestRegion,
    PageServer,
    PageServerConfig,
    PageServerStats,
    PageSource,
    ServerState,
)

__all__ = [
    "Extent",
    "FileSource",
    "GuestRegion",
    "PageServer",
    "PageServerConfig",
    "PageServerStats",
    "PageSource",
    "ServerState",
]
