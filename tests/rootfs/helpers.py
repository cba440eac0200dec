"""rootfs test helpers: base images with known content, disk reads and writes, a strict fake runner."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import subprocess
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from wrenbox.command import Completed
from wrenbox.errors import CommandFailed
from wrenbox.rootfs import Disk, DiskFormat

MiB = 1 << 20


def make_base(path: Path, size: int = 8 * MiB, seed: int = 1) -> bytes:
    """A sparse base image: random data in every other MiB, holes between. Returns its content."""
    rng = random.Random(seed)
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, 2 * MiB):
            block = rng.randbytes(min(MiB, size - offset))
            f.seek(offset)
            f.write(block)
            content[offset : offset + len(block)] = block
    return bytes(content)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_digest(content: bytes) -> str:
    """The documented content digest, computed naively from the bytes (no holes, no extents)."""
    digest = hashlib.sha256()
    for offset in range(0, len(content), 64 * 1024):
        block = content[offset : offset + 64 * 1024]
        if block.count(0) != len(block):
            digest.update(struct.pack("<QQ", offset, len(block)) + block)
    digest.update(struct.pack("<Q", len(content)))
    return f"sha256-blocks64k:{digest.hexdigest()}"


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def temporaries(directory: Path) -> list[Path]:
    """Leftover temporaries of atomic_output (there must never be any)."""
    return list(directory.glob(".*.tmp-*"))


def write_pattern(disk: Disk, offset: int, length: int, byte: int, expected: bytearray) -> None:
    """Write ``length`` bytes of ``byte`` at ``offset`` through the disk, and into the model ``expected``."""
    if disk.format is DiskFormat.QCOW2:
        _qemu_io(disk.path, f"write -P {byte:#x} {offset} {length}")
    else:
        overwrite(disk.path, offset, bytes([byte]) * length)
    expected[offset : offset + length] = bytes([byte]) * length


def assert_content(disk: Disk, expected: bytes, scratch: Path) -> None:
    """The disk reads exactly ``expected`` (qcow2 checked by qemu-img itself, not by our flatten)."""
    if disk.format is DiskFormat.QCOW2:
        model = scratch / "expected.raw"
        model.write_bytes(expected)
        cmd = ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(model), str(disk.path)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        model.unlink()
        assert result.returncode == 0, f"overlay differs from the expected content: {result.stdout}"
        info = json.loads(host(["qemu-img", "info", "--output=json", str(disk.path)]))
        assert info["virtual-size"] == len(expected)
    else:
        actual = disk.path.read_bytes()
        assert len(actual) == len(expected)
        assert actual == expected, f"first difference at {_first_difference(actual, expected)}"


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _qemu_io(path: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)], check=True, capture_output=True)


def host(argv: Sequence[str]) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout


@dataclass(frozen=True)
class Expected:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    input: bytes | None
    hang: bool


class FakeRunner:
    """A command runner that accepts exactly the scripted commands, in order, and nothing else.

    Anything unexpected is recorded in ``errors`` (and raised): the test's teardown fails on it even
    when the backend swallowed the exception (rollback undos log and continue).
    """

    def __init__(self) -> None:
        self.script: deque[Expected] = deque()
        self.calls: list[tuple[str, ...]] = []
        self.errors: list[str] = []

    def expect(
        self,
        *argv: str,
        rc: int = 0,
        out: str = "",
        err: str = "",
        input: bytes | None = None,
        hang: bool = False,
    ) -> None:
        self.script.append(Expected(tuple(argv), rc, out, err, input, hang))

    def _fail(self, message: str) -> None:
        self.errors.append(message)
        raise AssertionError(message)

    async def __call__(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> Completed:
        argv = tuple(argv)
        self.calls.append(argv)
        if not self.script:
            self._fail(f"unexpected command {' '.join(argv)!r}")
        want = self.script.popleft()
        if argv != want.argv:
            self._fail(f"expected {' '.join(want.argv)!r}, got {' '.join(argv)!r}")
        if input != want.input:
            self._fail(f"{' '.join(argv)!r}: expected input {want.input!r}, got {input!r}")
        if want.hang:
            import anyio

            await anyio.sleep_forever()
        done = Completed(argv, want.returncode, want.stdout.encode(), want.stderr.encode())
        if check and want.returncode != 0:
            raise CommandFailed(argv, want.returncode, want.stderr)
        return done

    def verify(self) -> None:
        assert not self.errors, self.errors
        assert not self.script, f"expected commands never ran: {[' '.join(e.argv) for e in self.script]}"
