"""Looking into a real sandbox from a test: files with known content, their hashes as the guest sees
them, a background process that must survive, and the sandbox's paused memory chain on the host."""

from __future__ import annotations

import hashlib
import os
import random
import shlex
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx

from wrenbox.envd.endpoint import ENVD_PORT
from wrenbox.manager import SandboxManager
from wrenbox.memory.format import HEADER_NAME, Header
from wrenbox.records import SandboxRecord
from wrenbox.runtime.host import HostRuntime

TMPFS_FILE = "/dev/shm/integrity.bin"  # guest RAM only: lives in the memory snapshot
DISK_FILE = "/home/user/integrity.bin"  # the guest's root disk (qcow2 overlay on the host)
# Written then renamed: a reader never catches the file empty between truncate and write.
COUNTER = (
    "i=0; while true; do i=$((i+1)); echo $i > /dev/shm/counter.new; "
    "mv /dev/shm/counter.new /dev/shm/counter; sleep 0.2; done"
)


async def run(mgr: SandboxManager, sandbox_id: str, cmd: str, *, user: str | None = None) -> str:
    """Run ``cmd``, insist that it succeeded, return its stdout as text."""
    result = await mgr.exec(sandbox_id, cmd, user=user)
    assert result.exit_code == 0, f"{cmd!r} exited {result.exit_code}: {result.stderr!r}"
    return result.stdout.decode()


async def upload(mgr: SandboxManager, sandbox_id: str, path: str, data: bytes) -> None:
    async with mgr.use(sandbox_id) as envd:
        await envd.files.upload(path, data)


async def guest_sha256(
    mgr: SandboxManager, sandbox_id: str, *paths: str, from_disk: bool = False
) -> list[str]:
    """The guest's sha256 of each path. ``from_disk`` drops the guest's page cache first, so disk files
    are read back from the virtual disk rather than from guest memory."""
    quoted = " ".join(shlex.quote(p) for p in paths)
    cmd = (
        f"sync && echo 3 > /proc/sys/vm/drop_caches && sha256sum {quoted}"
        if from_disk
        else f"sha256sum {quoted}"
    )
    out = await run(mgr, sandbox_id, cmd, user="root")
    return [line.split()[0] for line in out.splitlines()]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Contents:
    """What the host knows the guest's two integrity files hold."""

    tmpfs: bytes
    disk: bytes

    @classmethod
    def random(cls, size: int) -> Contents:
        return cls(os.urandom(size), os.urandom(size))

    @classmethod
    def seeded(cls, seed: str, size: int = 1 << 18) -> Contents:
        """The same bytes for the same seed (a crash worker writes what its test checks)."""
        rng = random.Random(seed)
        return cls(rng.randbytes(size), rng.randbytes(size))

    async def write(self, mgr: SandboxManager, sandbox_id: str) -> None:
        await upload(mgr, sandbox_id, TMPFS_FILE, self.tmpfs)
        await upload(mgr, sandbox_id, DISK_FILE, self.disk)

    async def check(self, mgr: SandboxManager, sandbox_id: str) -> list[str]:
        """Names of the files whose guest hash differs from the expected one (empty: all intact)."""
        found = await guest_sha256(mgr, sandbox_id, TMPFS_FILE, DISK_FILE, from_disk=True)
        expected = [sha256(self.tmpfs), sha256(self.disk)]
        return [name for name, a, b in zip((TMPFS_FILE, DISK_FILE), found, expected, strict=True) if a != b]


async def counter(mgr: SandboxManager, sandbox_id: str) -> int:
    return int((await run(mgr, sandbox_id, "cat /dev/shm/counter")).strip() or 0)


async def start_counter(mgr: SandboxManager, sandbox_id: str) -> int:
    """Start the counter and return its pid once it has counted (its first write can lag the start by
    a scheduling round on a busy host; a read before it would find no file)."""
    async with mgr.use(sandbox_id) as envd:
        pid = await envd.processes.start(COUNTER, tag="counter")
    for _ in range(300):
        if (await run(mgr, sandbox_id, "cat /dev/shm/counter 2>/dev/null || true")).strip():
            return pid
        await anyio.sleep(0.1)
    raise AssertionError("the counter never counted")


async def process_tags(mgr: SandboxManager, sandbox_id: str) -> list[str | None]:
    async with mgr.use(sandbox_id) as envd:
        return [p.tag for p in await envd.processes.list()]


def memory_header(runtime: HostRuntime, sandbox_id: str) -> Header:
    return Header.read(runtime.files.snapshot_dir(sandbox_id) / HEADER_NAME)


def tree(directory: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``directory``: relative path → (size, sha256). Compares snapshots exactly."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(directory))] = (path.stat().st_size, sha256(path.read_bytes()))
    return out


async def agent_status(rec: SandboxRecord, token: str | None) -> int:
    """The HTTP status the sandbox's agent answers ``GET /envs`` with, given ``token`` (or none)."""
    headers = {} if token is None else {"X-Access-Token": token}
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"http://{rec.host_ip}:{ENVD_PORT}/envs", headers=headers)
    return response.status_code


def vm_cmdline(mgr: SandboxManager, sandbox_id: str) -> list[str]:
    """The command line of the sandbox's VMM process."""
    pid = mgr.get(sandbox_id).resources["vm"]["pid"]
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
