"""Real QEMU processes that fail to start or to restore: the error says why, and nothing is left running.

These need no guest image: QEMU itself refuses the kernel or the state file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wrenbox.errors import Unavailable
from wrenbox.vmm.base import Kernel, Machine, MemoryFile, Snapshot, SnapshotMeta, VmConfig
from wrenbox.vmm.qemu import QemuConfig, QemuDriver

pytestmark = [pytest.mark.vm, pytest.mark.anyio]

MACHINE = Machine(memory_mib=128, nics=())


def processes_using(path: Path) -> list[int]:
    """PIDs whose command line mentions ``path``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.fsencode(path) in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


async def test_boot_with_a_bad_kernel_reports_qemus_words(tmp_path: Path) -> None:
    driver = QemuDriver(QemuConfig(tsc_khz=2_000_000))
    (tmp_path / "vmlinuz").write_bytes(b"this is no kernel")
    config = VmConfig(
        machine=MACHINE,
        memory=MemoryFile(tmp_path / "ram"),
        run_dir=tmp_path / "run",
        kernel=Kernel(tmp_path / "vmlinuz"),
    )
    with pytest.raises(Unavailable, match=r"(?s)exited before its monitor answered.*qemu log.*kernel"):
        await driver.boot(config)
    assert processes_using(tmp_path) == []
    assert not (tmp_path / "run" / "qmp.sock").exists()


async def test_restore_of_a_garbled_state_fails_cleanly(tmp_path: Path) -> None:
    driver = QemuDriver()
    snap_dir = tmp_path / "snap"
    snap_dir.mkdir()
    (snap_dir / "vmstate").write_bytes(b"\0" * 64)
    meta = SnapshotMeta(
        vmm="qemu",
        vmm_version=await driver.version(),
        kind="full",
        pinned=driver.pinned(MACHINE),
        argv=(),
        state_bytes=64,
    )
    snapshot = Snapshot.save(snap_dir, meta)
    (tmp_path / "ram").touch()
    config = VmConfig(machine=MACHINE, memory=MemoryFile(tmp_path / "ram"), run_dir=tmp_path / "run")
    with pytest.raises(Unavailable, match=r"(?s)went away.*qemu log.*migration"):
        await driver.restore(config, snapshot)
    assert processes_using(tmp_path) == []
    assert not (tmp_path / "run" / "qmp.sock").exists()
