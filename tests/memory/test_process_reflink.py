"""On XFS (reflink), diffs and materialized RAM files share blocks with their sources instead of copying."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from wrenbox.memory.chain import Chain
from wrenbox.memory.format import diff_name
from wrenbox.memory.process import MemoryConfig, process_diff, process_full

pytestmark = pytest.mark.root

MiB = 1 << 20


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def xfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("xfs")
    image, mountpoint = work / "xfs.img", work / "mnt"
    with contextlib.ExitStack() as stack:
        stack.callback(image.unlink, missing_ok=True)
        with open(image, "wb") as f:
            f.truncate(1 << 30)  # sparse; xfs wants at least 300 MB
        sh("mkfs.xfs", "-q", "-m", "reflink=1", str(image))
        device = sh("losetup", "--find", "--show", str(image)).strip()
        stack.callback(sh, "losetup", "--detach", device)
        mountpoint.mkdir()
        sh("mount", device, str(mountpoint))
        stack.callback(sh, "umount", str(mountpoint))
        yield mountpoint


def used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_diffs_and_ram_files_share_blocks_on_xfs(xfs: Path) -> None:
    raw = xfs / "guest.raw"
    with open(raw, "wb") as f:
        f.truncate(96 * MiB)
        for at in range(0, 96 * MiB, 2 * MiB):  # 1 MiB of data in every 2 MiB
            f.seek(at)
            f.write(os.urandom(MiB))
    memory = raw.read_bytes()
    (xfs / "s0").mkdir()
    before = used(xfs)
    header = process_full(raw, xfs / "s0")
    assert used(xfs) - before < 4 * MiB  # 48 MiB of data stored, blocks shared with the raw file
    assert (xfs / "s0" / diff_name(header.build_id)).stat().st_size == 48 * MiB

    with Chain.open(xfs / "s0") as chain:  # checksums verified against the shared blocks
        before = used(xfs)
        chain.materialize(xfs / "ram")
        assert used(xfs) - before < 4 * MiB
    assert (xfs / "ram").read_bytes() == memory

    # the guest changes 8 MiB; the next pause (and a collapse) shares blocks too, and reads back exactly
    with open(xfs / "ram", "r+b") as f:
        f.seek(10 * MiB)
        f.write(os.urandom(8 * MiB))
    changed = (xfs / "ram").read_bytes()
    for name, config in (("s1", MemoryConfig()), ("flat", MemoryConfig(max_generations=1))):
        (xfs / name).mkdir()
        with Chain.open(xfs / "s0") as parent:
            before = used(xfs)
            process_diff(xfs / "ram", parent, xfs / name, config=config)
            assert used(xfs) - before < 4 * MiB
        with Chain.open(xfs / name) as chain:
            assert chain.read(0, chain.size) == changed
            assert chain.generation == (1 if name == "s1" else 0)
