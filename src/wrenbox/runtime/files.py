"""Where a sandbox's files are on this host, and what its paused state on disk holds.

::

    <sandboxes_dir>/<id>/run/        the VMM's sockets and logs while a VM runs
    <sandboxes_dir>/<id>/snapshot/   its paused state: sandbox.json (:class:`PauseMeta`), and unless it
                                     was paused disk-only, the memory chain (memfile.*, see
                                     :mod:`wrenbox.memory`) and the VMM's device state (vm/)
    <memory_dir>/<id>.ram            guest RAM while it runs (a VM's own file, mapped shared)

Everything here is blocking file work; the runtime calls it on a worker thread where it can be long.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from wrenbox.fileio import private_dir
from wrenbox.memory.chain import Chain
from wrenbox.memory.format import HEADER_NAME, Header
from wrenbox.memory.process import MemoryConfig, process_diff, process_full
from wrenbox.names import validate_sandbox_id

__all__ = ["PauseMeta", "SandboxFiles"]

VM_STATE = "vm"  # the VMM's snapshot inside a sandbox snapshot directory
META = "sandbox.json"


@dataclass(frozen=True, slots=True)
class PauseMeta:
    """What a pause wrote (the last file of its snapshot directory). ``token`` is new on every pause: it
    tells which snapshot a checkpoint or an interrupted pause belongs to."""

    token: str
    memory: bool  # the memory was kept (else the sandbox boots again from its disk on resume)
    paused_at: float


class SandboxFiles:
    """The files of the sandboxes of one data dir. Sandbox ids are validated before they become paths."""

    def __init__(self, sandboxes_dir: Path, memory_dir: Path) -> None:
        self.sandboxes_dir = sandboxes_dir
        self.memory_dir = memory_dir
        sandboxes_dir.mkdir(parents=True, exist_ok=True)
        private_dir(memory_dir)  # under /dev/shm, which anyone can write

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.sandboxes_dir / validate_sandbox_id(sandbox_id)

    def run_dir(self, sandbox_id: str) -> Path:
        return self.sandbox_dir(sandbox_id) / "run"

    def snapshot_dir(self, sandbox_id: str) -> Path:
        return self.sandbox_dir(sandbox_id) / "snapshot"

    def ram_file(self, sandbox_id: str) -> Path:
        return self.memory_dir / f"{validate_sandbox_id(sandbox_id)}.ram"

    # -- the paused state ------------------------------------------------------------------------------

    def pause_meta(self, sandbox_id: str) -> PauseMeta | None:
        """The snapshot on disk, None if there is none (or only a half-written one)."""
        try:
            data = json.loads((self.snapshot_dir(sandbox_id) / META).read_text())
            return PauseMeta(data["pause_token"], data.get("memory", True), data["paused_at"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def write_pause_meta(directory: Path, meta: PauseMeta) -> None:
        data = asdict(meta)
        data["pause_token"] = data.pop("token")
        (directory / META).write_text(json.dumps(data))

    @staticmethod
    def vm_state(directory: Path) -> Path:
        """Where the VMM's device state goes inside a snapshot directory being written."""
        return directory / VM_STATE

    def write_memory(self, sandbox_id: str, out: Path, config: MemoryConfig) -> None:
        """The sandbox's RAM file as a compact chain in ``out``: a diff against the snapshot on disk if it
        has memory, else complete (generation 0)."""
        ram, snap_dir = self.ram_file(sandbox_id), self.snapshot_dir(sandbox_id)
        if (snap_dir / HEADER_NAME).exists():
            with Chain.open(snap_dir, verify=False) as parent:
                process_diff(ram, parent, out, config=config)
        else:
            process_full(ram, out)

    def materialize(self, sandbox_id: str, dest: Path) -> None:
        """Guest RAM of the paused sandbox as a sparse file at ``dest`` (every diff file's checksum is
        verified first: corruption is never served)."""
        with Chain.open(self.snapshot_dir(sandbox_id)) as chain:
            chain.materialize(dest)

    def copy_paused_state(self, sandbox_id: str, snapshot_dir: Path, memory: Path) -> None:
        """The paused sandbox's device state into ``snapshot_dir`` and its memory, whole, at ``memory``."""
        for item in self.vm_state(self.snapshot_dir(sandbox_id)).iterdir():
            shutil.copy2(item, snapshot_dir / item.name)
        self.materialize(sandbox_id, memory)

    # -- what it costs -------------------------------------------------------------------------------

    def snapshot_usage(self, sandbox_id: str) -> dict[str, int]:
        """Bytes of the snapshot on disk, and when it holds memory, how much guest memory (non-zero
        blocks) it holds and what its memory files cost on disk."""
        snap_dir = self.snapshot_dir(sandbox_id)
        out = {"snapshot_bytes": allocated(snap_dir)}
        header = snap_dir / HEADER_NAME
        if header.exists():
            memfiles = [p for p in snap_dir.glob("memfile*") if p.name != HEADER_NAME]
            out["snapshot_memory_file_bytes"] = sum(allocated_file(p) for p in memfiles)
            out["snapshot_memory_bytes"] = sum(
                m.length for m in Header.read(header).mappings if not m.is_zero
            )
        return out

    # -- removal -----------------------------------------------------------------------------------

    def remove(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


def new_pause(memory: bool, token: str) -> PauseMeta:
    return PauseMeta(token=token, memory=memory, paused_at=time.time())


def allocated(path: Path) -> int:
    """Bytes the files under ``path`` occupy on disk."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def allocated_file(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0
