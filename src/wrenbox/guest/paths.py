"""Turning request paths into file system paths, and file system errors into wrenbox errors.

Every path a client sends passes through :func:`resolve`: it is checked (no NUL, not absurdly long),
``~`` is expanded to the acting user's home, and a relative path is taken relative to that home (as
envd does). The result is absolute and normalised; it is not confined anywhere, because the agent acts
for users who may legitimately touch any path they have permission for.
"""

from __future__ import annotations

import errno
import os

from wrenbox.errors import AlreadyExists, Conflict, InvalidArgument, NotFound, PermissionDenied, WrenboxError

from .users import User

__all__ = ["chown_to", "ensure_dir", "ensure_parent_dirs", "error_from_os", "resolve", "safe_text"]

MAX_PATH_LENGTH = 4096  # PATH_MAX: the kernel refuses anything longer anyway


def resolve(path: str, user: User, default_dir: str | None = None) -> str:
    """The absolute path ``path`` names for ``user``; empty means ``default_dir`` or the home."""
    if "\0" in path:
        raise InvalidArgument("path contains a NUL byte")
    if len(path) > MAX_PATH_LENGTH:
        raise InvalidArgument(f"path is longer than {MAX_PATH_LENGTH} characters")
    if not path:
        path = default_dir or user.home
    if path == "~" or path.startswith("~/"):
        path = user.home + path[1:]
    elif path.startswith("~"):
        raise InvalidArgument(
            f"cannot expand {path.split('/', 1)[0]!r}: only '~' (the user's home) is supported"
        )
    if not os.path.isabs(path):
        path = os.path.join(user.home, path)
    normalized = os.path.normpath(path)
    # POSIX lets normpath keep a leading "//"; Linux gives it no meaning.
    return "/" + normalized.lstrip("/") if normalized.startswith("//") else normalized


def safe_text(name: str) -> str:
    """A file name that can go into a protobuf string or JSON even if it is not valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "replace")
    return name


_BY_ERRNO: dict[int, type[WrenboxError]] = {
    errno.ENOENT: NotFound,
    errno.EEXIST: AlreadyExists,
    errno.ENOTEMPTY: AlreadyExists,
    errno.EACCES: PermissionDenied,
    errno.EPERM: PermissionDenied,
    errno.EROFS: PermissionDenied,
    errno.ENOTDIR: InvalidArgument,
    errno.EISDIR: InvalidArgument,
    errno.ENAMETOOLONG: InvalidArgument,
    errno.ELOOP: InvalidArgument,
    errno.EINVAL: InvalidArgument,
    errno.EXDEV: InvalidArgument,
    errno.EBUSY: Conflict,
}


def error_from_os(err: OSError, path: str) -> WrenboxError:
    """The wrenbox error for an OSError on ``path``, with a message that names the path."""
    reason = err.strerror or str(err)
    cls = _BY_ERRNO.get(err.errno or 0, WrenboxError)
    shown = safe_text(path)
    if cls is NotFound:
        return NotFound(f"path {shown!r} does not exist")
    return cls(f"{reason}: {shown!r}")


def ensure_parent_dirs(path: str, user: User) -> None:
    """Create the missing parents of ``path``, owned by ``user`` (like ``mkdir -p`` then chown)."""
    ensure_dir(os.path.dirname(path) or "/", user)


def ensure_dir(directory: str, user: User) -> bool:
    """Create ``directory`` and its missing parents owned by ``user``; False if it already existed."""
    missing: list[str] = []
    probe = directory
    while True:
        try:
            st = os.stat(probe)
        except FileNotFoundError:
            missing.append(probe)
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
            continue
        except OSError as err:
            raise error_from_os(err, probe) from None
        if not _is_dir(st.st_mode):
            raise InvalidArgument(f"{safe_text(probe)!r} exists and is not a directory")
        break
    for new_dir in reversed(missing):
        try:
            os.mkdir(new_dir, 0o755)
        except FileExistsError:
            continue  # created concurrently: fine
        except OSError as err:
            raise error_from_os(err, new_dir) from None
        chown_to(new_dir, user)
    return not missing


def chown_to(path: str, user: User) -> None:
    """Give ``path`` to ``user`` when the agent is root (elsewhere it already belongs to us)."""
    if os.geteuid() == 0 and user.uid != 0:
        try:
            os.chown(path, user.uid, user.gid, follow_symlinks=False)
        except OSError as err:
            raise error_from_os(err, path) from None


def _is_dir(mode: int) -> bool:
    return (mode & 0o170000) == 0o040000
