"""Where a restored Firecracker VM's memory comes from, checked before Firecracker starts.

A :class:`~wrenbox.vmm.base.MemoryFile` is Firecracker's ``File`` backend: a complete memory image,
mapped private (Firecracker only reads it). A :class:`~wrenbox.vmm.base.PagedMemory` is the ``Uffd``
backend: a memory chain served lazily by a page server of the VM's own, which Firecracker connects to
during the load.
"""

from __future__ import annotations

from pathlib import Path

from wrenbox.errors import InvalidArgument, NotFound
from wrenbox.memory.uffd import PageServer, PageServerConfig
from wrenbox.memory.uffd.chain_source import ChainSource
from wrenbox.vmm.base import PagedMemory, Snapshot, VmConfig

__all__ = ["RAW_MEMORY", "memory_backend", "page_server"]

RAW_MEMORY = "memfile.raw"
"""The memory file a snapshot writes next to its state: complete (Full) or only the pages written since
the previous snapshot (Diff)."""


def memory_backend(config: VmConfig, snapshot: Snapshot, uffd_socket: Path) -> dict[str, str]:
    """The ``mem_backend`` of the load call; a memory file must exist and be the guest's size."""
    memory = config.memory
    if isinstance(memory, PagedMemory):
        return {"backend_type": "Uffd", "backend_path": str(uffd_socket)}
    path = memory.path
    if snapshot.meta.kind == "diff" and path == snapshot.dir / RAW_MEMORY:
        raise InvalidArgument(
            f"{path} holds only the pages written since the previous snapshot; restore from the "
            "processed memory chain (PagedMemory) or a memory file materialised from it"
        )
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise NotFound(f"memory file {path} of snapshot {snapshot.dir} does not exist") from None
    if size != config.machine.memory_mib << 20:
        raise InvalidArgument(
            f"memory file {path} has {size} bytes; the guest has {config.machine.memory_mib} MiB"
        )
    return {"backend_type": "File", "backend_path": str(path)}


def page_server(config: VmConfig, socket: Path, settings: PageServerConfig) -> PageServer:
    """A page server (not started) for ``config``'s PagedMemory; the chain's checksums are verified
    first, so nothing damaged is ever served. Blocking."""
    memory = config.memory
    if not isinstance(memory, PagedMemory):
        raise InvalidArgument(f"{memory!r} is not served by a page server")
    socket.parent.mkdir(parents=True, exist_ok=True)
    source = ChainSource.open(memory.snapshot_dir)
    try:
        expected = config.machine.memory_mib << 20
        if source.size != expected:
            raise InvalidArgument(
                f"memory snapshot {memory.snapshot_dir} has {source.size} bytes; the guest has {expected}"
            )
        return PageServer(socket, source, settings)
    except BaseException:
        source.close()
        raise
