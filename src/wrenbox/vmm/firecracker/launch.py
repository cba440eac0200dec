"""Starting and ending a Firecracker process: its own mount namespace, the sandbox's network namespace.

The command (:func:`launch_argv`)::

    unshare --mount --propagation private -- /bin/sh -c LAUNCH wrenbox-fc MOUNT LN VM_DIR \\
        rootfs.ext4 DISK [drive1 DISK ...] -- nsenter --net=NETNS -- FIRECRACKER --api-sock SOCKET

``LAUNCH`` is a constant script: every value reaches it as an argument, never as script text. It mounts
a tmpfs on ``vm_dir`` that only this namespace sees, links each disk into it and exec-replaces itself
(nsenter does the same), so the pid spawned is Firecracker's and the namespace, with its links, ends
with it. Drives are configured by their link path: a snapshot records ``<vm_dir>/rootfs.ext4``, which
resolves to whatever disk the restoring namespace links in (each sandbox its own copy-on-write disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from wrenbox.command import require_tool
from wrenbox.errors import Timeout, Unavailable
from wrenbox.pids import ProcessRef

__all__ = ["drive_link", "end_process", "launch_argv", "wait_for_socket"]

_POLL_S = 0.01
_KILL_WAIT_S = 5.0

# $1 mount, $2 ln, $3 the directory, then (link name, target) pairs up to "--", then the command to exec.
_LAUNCH = (
    "set -eu; mount=$1 ln=$2 dir=$3; shift 3; "
    '"$mount" -t tmpfs -o mode=0755,size=64k,nosuid,nodev wrenbox-fc "$dir"; '
    'while [ "$1" != -- ]; do "$ln" -s -- "$2" "$dir/$1"; shift 2; done; '
    'shift; exec "$@"'
)


def drive_link(index: int) -> str:
    """The name drive ``index`` has in the VM's directory (``rootfs.ext4`` for the root disk)."""
    return "rootfs.ext4" if index == 0 else f"drive{index}"


def launch_argv(
    command: Sequence[str], *, vm_dir: Path, disks: Sequence[Path], netns: Path | None
) -> list[str]:
    """Run ``command`` with ``disks`` linked into a private ``vm_dir``, in network namespace ``netns``."""
    links = []
    for i, disk in enumerate(disks):
        links += [drive_link(i), str(disk)]
    enter = [] if netns is None else [require_tool("nsenter"), f"--net={netns}", "--"]
    return [
        require_tool("unshare"), "--mount", "--propagation", "private", "--",
        "/bin/sh", "-c", _LAUNCH, "wrenbox-fc",
        require_tool("mount"), require_tool("ln"), str(vm_dir), *links, "--",
        *enter, *command,
    ]  # fmt: skip


async def wait_for_socket(
    path: Path, process: ProcessRef, timeout: float, why_gone: Callable[[], str]
) -> None:
    """Until ``path`` accepts a connection; fails early, with ``why_gone()``, if ``process`` exited."""
    deadline = time.monotonic() + timeout
    while True:
        if not process.alive():
            raise Unavailable(f"Firecracker exited before its API socket appeared{why_gone()}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_unix_connection(os.fspath(path))
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        if time.monotonic() >= deadline:
            raise Timeout(f"Firecracker's API socket {path} did not appear within {timeout:g} s{why_gone()}")
        await asyncio.sleep(_POLL_S)


def end_process(process: ProcessRef, grace: float) -> None:
    """SIGTERM, up to ``grace`` seconds to exit, then SIGKILL; reaps it if it is our child. Blocking."""
    if _signal_group(process, signal.SIGTERM) and process.wait_gone(grace):
        return
    if _signal_group(process, signal.SIGKILL):
        process.wait_gone(_KILL_WAIT_S)
    process.wait_gone(0)


def _signal_group(process: ProcessRef, sig: int) -> bool:
    """Signal the process group ``process`` leads (spawn() gives it a session of its own, so a launcher
    that failed halfway leaves no helper behind); False if it is gone."""
    if not process.alive():
        return False
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:  # not a group leader after all (adopted from elsewhere)
        return process.signal(sig)
    return True
