"""The one way wrenbox runs host programs.

``run`` / ``arun`` run a program to completion and raise :class:`~wrenbox.errors.CommandFailed` with its
stderr when it fails. ``require_tool`` turns a missing program into a :class:`~wrenbox.errors.MissingTool`
that names the Debian package to install. ``spawn`` starts a long-lived child (QEMU, ...) detached in its
own session, output to a log file, and returns the :class:`wrenbox.pids.ProcessRef` that tracks it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from wrenbox.errors import CommandFailed, MissingTool, Timeout
from wrenbox.pids import ProcessRef

__all__ = ["Completed", "arun", "require_tool", "run", "spawn"]

# Programs wrenbox calls, and the Debian package that ships each one.
PACKAGE_OF: dict[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "mount": "mount",
    "ln": "coreutils",
    "debootstrap": "debootstrap",
    "busybox": "busybox-static",
    "cpio": "cpio",
    "depmod": "kmod",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "mkfs.btrfs": "btrfs-progs",
    "nft": "nftables",
    "ip": "iproute2",
    "losetup": "mount",
    "dmsetup": "dmsetup",
    "blockdev": "util-linux",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
    "apt-cache": "apt",
    "chroot": "coreutils",
    "cp": "coreutils",
    "umount": "mount",
    "zstd": "zstd",
    "gzip": "gzip",
}


@dataclass(frozen=True, slots=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


def require_tool(name: str, package: str | None = None) -> str:
    """Absolute path of host program ``name``; MissingTool (naming the package) if it is not installed."""
    # sbin directories are often not on a non-root PATH even though root-only tools live there.
    path = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if path is None:
        raise MissingTool(name, package or PACKAGE_OF.get(name, name))
    return path


def _resolve(argv: Sequence[str]) -> list[str]:
    if not argv:
        raise ValueError("empty argv")
    first = argv[0] if os.sep in argv[0] else require_tool(argv[0])
    return [first, *argv[1:]]


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    timeout: float | None = 120.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Completed:
    """Run ``argv`` to completion and capture its output.

    Raises CommandFailed if it exits non-zero (when ``check``), Timeout if it outlives ``timeout``
    (the child is killed first), MissingTool if the program is not installed.
    """
    full = _resolve(argv)
    try:
        proc = subprocess.run(
            full,
            input=input,
            capture_output=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise Timeout(f"{' '.join(argv)!r} did not finish within {timeout} s") from exc
    except OSError as exc:
        raise CommandFailed(argv, None, str(exc)) from exc
    done = Completed(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, proc.stderr.decode(errors="replace"))
    return done


async def arun(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    timeout: float | None = 120.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Completed:
    """Async twin of :func:`run`; the child is killed if the caller is cancelled or times out."""
    full = _resolve(argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    except OSError as exc:
        raise CommandFailed(argv, None, str(exc)) from exc
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(input)
    except BaseException as exc:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if isinstance(exc, TimeoutError):
            raise Timeout(f"{' '.join(argv)!r} did not finish within {timeout} s") from exc
        raise
    assert proc.returncode is not None
    done = Completed(tuple(argv), proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, err.decode(errors="replace"))
    return done


def spawn(
    argv: Sequence[str],
    *,
    log: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
) -> ProcessRef:
    """Start a long-lived child in its own session, stdin from /dev/null, stdout+stderr appended to ``log``.

    The child survives wrenbox (a restart adopts it through the returned ProcessRef). posix_spawn rather
    than Popen: there is no Popen object to keep alive or to warn when dropped, and nothing runs between
    fork and exec.
    """
    full = _resolve(argv)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.fspath(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    try:
        pid = os.posix_spawn(
            full[0], full, dict(os.environ if env is None else env), file_actions=actions, setsid=True
        )
    except OSError as exc:
        raise CommandFailed(argv, None, str(exc)) from exc
    try:
        return ProcessRef.of(pid)
    except ProcessLookupError:
        # Gone already (exec failed, e.g. a bad log path): reap it and report what it printed.
        os.waitpid(pid, 0)
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 2000))
            tail = f.read().decode(errors="replace")
        raise CommandFailed(argv, None, f"exited immediately: {tail}") from None
