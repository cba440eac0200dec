"""After a crash: find what wrenbox left on the host that no sandbox record names, and remove it.

The ledger (:mod:`wrenbox.ledger`) writes a resource down before using it, but the instant between
creating a thing and writing it down can still be cut by a SIGKILL. Everything wrenbox creates carries
its data directory in a name or a command line, so a sweep can find it again: VMM processes whose
command line points into our directories, network slots of our prefix, disks in our disks dir, RAM
files in our memory dir, sandbox directories, half-written snapshots and template builds.

The sweep only touches what belongs to this data directory and is not named by a record.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from wrenbox.memory import writer
from wrenbox.network import NetworkSlot
from wrenbox.pids import ProcessRef
from wrenbox.records import SandboxRecord
from wrenbox.rootfs import Disk
from wrenbox.runtime.base import Resource as R

if TYPE_CHECKING:
    from wrenbox.runtime.host import HostRuntime

__all__ = ["our_processes", "sweep"]

log = logging.getLogger(__name__)


def our_processes(roots: Iterable[Path]) -> list[ProcessRef]:
    """Running processes whose command line names a path under one of ``roots`` (VMMs we started)."""
    needles = [os.fsencode(f"{root}/") for root in roots]
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
            if any(n in cmdline for n in needles):
                found.append(ProcessRef.of(int(entry.name)))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


async def sweep(runtime: HostRuntime, records: list[SandboxRecord]) -> dict[str, list[str]]:
    """Remove every host object of this data dir that ``records`` do not name; report what went."""
    report: dict[str, list[str]] = {}
    vms = {
        ProcessRef(int(r.resources[R.VM]["pid"]), int(r.resources[R.VM]["start_time"]))
        for r in records
        if R.VM in r.resources
    }
    roots = [runtime.files.sandboxes_dir, runtime.templates.root]
    stray = [p for p in our_processes(roots) if p not in vms]
    for process in stray:
        await anyio.to_thread.run_sync(process.terminate, 5.0)
    report["processes"] = [str(p.pid) for p in stray]

    slots = [NetworkSlot.from_dict(r.resources[R.SLOT]) for r in records if R.SLOT in r.resources]
    runtime.network.adopt(slot.index for slot in slots)
    report["slots"] = [str(i) for i in await runtime.network.reclaim()]
    prefix = runtime.network.config.prefix
    report["cgroups"] = await anyio.to_thread.run_sync(runtime.launcher.reclaim_cgroups, prefix, slots)
    disks = [Disk.model_validate(r.resources[R.DISK]) for r in records if R.DISK in r.resources]
    report["disks"] = await runtime.rootfs.reclaim(disks)
    report["files"] = await anyio.to_thread.run_sync(_sweep_files, runtime, records)
    report["templates"] = await anyio.to_thread.run_sync(runtime.templates.reclaim)
    found = {k: v for k, v in report.items() if v}
    if found:
        log.warning("reclaimed what a previous run left behind: %s", found)
    return report


def _sweep_files(runtime: HostRuntime, records: list[SandboxRecord]) -> list[str]:
    removed: list[str] = []
    holding = {r.id: r for r in records if r.resources}
    memory = {runtime.files.ram_file(r.id) for r in holding.values() if R.MEMORY in r.resources}
    for path in runtime.files.memory_dir.glob("*"):
        if path not in memory:
            path.unlink(missing_ok=True)
            removed.append(str(path))
    for path in runtime.files.sandboxes_dir.iterdir():
        rec = holding.get(path.name)
        if rec is None:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
            continue
        removed += [str(p) for p in writer.reclaim(runtime.files.snapshot_dir(rec.id))]
        if R.VM not in rec.resources and runtime.files.run_dir(rec.id).exists():
            shutil.rmtree(runtime.files.run_dir(rec.id), ignore_errors=True)
            removed.append(str(runtime.files.run_dir(rec.id)))
    return removed
