"""The Firecracker driver, for KVM hosts.

- :mod:`.driver` — :class:`FirecrackerDriver` / :class:`FirecrackerVm`: boot, restore, pause, snapshot
  through the API socket.
- :mod:`.api` — the API client (HTTP/1.1 over the Unix socket, deadlines per call).
- :mod:`.launch` — starting the process in its own mount namespace inside the sandbox's network namespace.
- :mod:`.memory` — where a restore's guest RAM comes from (a file, or the UFFD page server).
"""

from wrenbox.vmm.firecracker.driver import (
    API_SOCKET,
    RAW_MEMORY,
    FirecrackerConfig,
    FirecrackerDriver,
    FirecrackerVm,
    boot_calls,
)

__all__ = [
    "API_SOCKET",
    "RAW_MEMORY",
    "FirecrackerConfig",
    "FirecrackerDriver",
    "FirecrackerVm",
    "boot_calls",
]
