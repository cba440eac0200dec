"""Named network namespaces, compatible with ``ip netns`` (a bind mount under ``/run/netns``).

A namespace is created in-process (``unshare`` in a short-lived thread, then a bind mount of that
thread's namespace), which costs about a millisecond; pyroute2's helper forks a child for it.

Network namespaces are per *thread*: :func:`call_in_netns` runs a function on a fresh thread that
has entered the namespace and ends with it, so no thread is ever left inside a slot. Whatever the
function creates there stays there: a socket keeps its namespace for its whole life, and a child
started with ``subprocess.Popen`` inherits the namespace of the thread that started it::

    sock = call_in_netns(slot.netns, socket.create_connection, ("169.254.0.21", 49983))
    qemu = call_in_netns(slot.netns, subprocess.Popen, argv)

(A child started this way must not use ``PR_SET_PDEATHSIG``: the "parent" it watches is the thread,
which ends as soon as the call returns. ``nsenter --net=/run/netns/<name>`` as a launcher has no
such catch.)

Everything here blocks briefly; from async code call it through ``anyio.to_thread.run_sync``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from wrenbox.errors import AlreadyExists, NotFound, Unsupported, WrenboxError
from wrenbox.names import validate_name
from wrenbox.network.plan import NETNS_DIR

__all__ = [
    "NETNS_DIR",
    "call_in_netns",
    "create_netns",
    "list_netns",
    "netns_exists",
    "open_netns",
    "remove_netns",
    "write_sysctl",
]

T = TypeVar("T")


_CLONE_NEWNET = 0x40000000
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_SHARED = 1 << 20
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _os_error(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def _wrap(what: str, exc: OSError) -> WrenboxError:
    if exc.errno == errno.EPERM:
        return Unsupported(f"{what}: not permitted; network slots need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)")
    return WrenboxError(f"{what}: {exc.strerror or exc}")


def _path(name: str) -> Path:
    return NETNS_DIR / validate_name(name, what="network namespace name")


def _share_dir() -> None:
    """Make NETNS_DIR a shared mount like ``ip netns add`` does, so namespaces show in other mount ns."""
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    directory = bytes(NETNS_DIR)
    if _libc.mount(b"none", directory, None, _MS_SHARED | _MS_REC, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point yet
        raise _os_error(f"make {NETNS_DIR} shared")
    if _libc.mount(directory, directory, None, _MS_BIND | _MS_REC, None) != 0:
        raise _os_error(f"bind {NETNS_DIR}")
    if _libc.mount(b"none", directory, None, _MS_SHARED | _MS_REC, None) != 0:
        raise _os_error(f"make {NETNS_DIR} shared")


def _on_thread(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on a new thread and hand back its result or exception."""
    outcome: list[Any] = []

    def body() -> None:
        try:
            outcome.append((True, fn(*args, **kwargs)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def create_netns(name: str) -> None:
    """Create the named namespace; AlreadyExists if the name is taken."""
    path = _path(name)
    try:
        _share_dir()
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError:
        raise AlreadyExists(f"network namespace {name!r} already exists") from None
    except OSError as exc:
        raise _wrap(f"create network namespace {name!r}", exc) from exc

    def unshare_and_bind() -> None:
        # The thread's new namespace outlives the thread through the bind mount.
        if _libc.unshare(_CLONE_NEWNET) != 0:
            raise _os_error("unshare(CLONE_NEWNET)")
        if _libc.mount(b"/proc/thread-self/ns/net", bytes(path), None, _MS_BIND, None) != 0:
            raise _os_error(f"bind mount {path}")

    try:
        _on_thread(f"netns-create-{name}", unshare_and_bind)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise _wrap(f"create network namespace {name!r}", exc) from exc


def remove_netns(name: str) -> bool:
    """Remove the named namespace; False if it was not there. Safe on a half-created one.

    The kernel frees the namespace once nothing uses it any more (processes still inside keep it).
    """
    path = _path(name)
    unmounted = _libc.umount2(bytes(path), _MNT_DETACH) == 0
    if not unmounted and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):  # not mounted, not there
        raise _wrap(f"remove network namespace {name!r}", _os_error(f"umount {path}"))
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def netns_exists(name: str) -> bool:
    return _path(name).exists()


def list_netns() -> list[str]:
    """Names of every named namespace (anyone's)."""
    try:
        return sorted(entry.name for entry in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def open_netns(name: str) -> int:
    """A file descriptor of the named namespace (the caller closes it); NotFound if it does not exist."""
    try:
        return os.open(_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"network namespace {name!r} does not exist") from None


def call_in_netns(name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` inside the named namespace, on a throwaway thread; return its result."""
    fd = open_netns(name)

    def inside() -> T:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            raise _wrap(f"enter network namespace {name!r}", _os_error("setns"))
        return fn(*args, **kwargs)

    try:
        return _on_thread(f"netns-{name}", inside)
    finally:
        os.close(fd)


def write_sysctl(key: str, value: str) -> None:
    """Set ``/proc/sys/<key>``; ``net/...`` keys apply to the calling thread's network namespace."""
    with open(Path("/proc/sys") / key, "w") as f:
        f.write(value)
