"""Real xfs / btrfs / ext4 filesystems on loop devices (root only), always unmounted and detached."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .helpers import FakeRunner

_MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}
# xfs refuses anything under 300 MB; the file is sparse, so this costs only the metadata mkfs writes.
_SIZE = 1 << 30


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def _loop_filesystem(kind: str, workdir: Path) -> Iterator[Path]:
    image, mountpoint = workdir / f"{kind}.img", workdir / kind
    with contextlib.ExitStack() as stack:
        stack.callback(image.unlink, missing_ok=True)
        with open(image, "wb") as f:
            f.truncate(_SIZE)
        _sh(*_MKFS[kind], str(image))
        device = _sh("losetup", "--find", "--show", str(image)).strip()
        stack.callback(_sh, "losetup", "--detach", device)
        mountpoint.mkdir()
        stack.callback(mountpoint.rmdir)
        _sh("mount", device, str(mountpoint))
        stack.callback(_sh, "umount", str(mountpoint))
        yield mountpoint


@pytest.fixture(scope="session")
def filesystems(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """One mounted loop filesystem per kind, for the whole session."""
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices and mount for xfs/btrfs/ext4 test filesystems)")
    workdir = tmp_path_factory.mktemp("loopfs")
    with contextlib.ExitStack() as stack:
        yield {kind: stack.enter_context(_loop_filesystem(kind, workdir)) for kind in _MKFS}


@pytest.fixture
def on_fs(filesystems: dict[str, Path]) -> Iterator[Callable[[str], Path]]:
    """``on_fs("xfs")`` → a fresh directory on that filesystem, removed after the test."""
    made: list[Path] = []

    def fresh(kind: str) -> Path:
        path = filesystems[kind] / uuid.uuid4().hex
        path.mkdir()
        made.append(path)
        return path

    yield fresh
    for path in made:
        shutil.rmtree(path)


@pytest.fixture
def fake_runner() -> Iterator[FakeRunner]:
    runner = FakeRunner()
    yield runner
    runner.verify()
