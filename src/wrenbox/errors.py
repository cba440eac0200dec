"""The one exception hierarchy of wrenbox.

Every error wrenbox raises on purpose is a :class:`WrenboxError`. Each class carries two stable
attributes, defined once here and used everywhere else:

``code``
    A machine-readable name. The names are the Connect / gRPC status codes (``not_found``,
    ``invalid_argument``, ...), because the guest agent speaks Connect and the HTTP API reports the
    same names, so one vocabulary covers the whole stack.
``http_status``
    The HTTP status the API answers with.

The tree::

    WrenboxError                      internal           500
    ├── InvalidArgument               invalid_argument   400   bad input; nothing was changed
    ├── Unauthenticated               unauthenticated    401
    ├── PermissionDenied              permission_denied  403
    ├── NotFound                      not_found          404
    ├── Conflict                      failed_precondition 409  the target is in the wrong state
    │   ├── AlreadyExists             already_exists     409
    │   ├── InUse                     failed_precondition 409  still referenced (template in use, ...)
    │   └── NotRunning                failed_precondition 409  sandbox not in a state that can serve this
    ├── Unavailable                   unavailable        503   limits reached, backend not ready
    │   ├── GuestError                unavailable        502   the guest agent failed or broke the rules
    │   ├── QuotaExceeded             resource_exhausted 429   a team's quota is used up: free something
    │   └── StorageFull               resource_exhausted 507   the host's data filesystem is full
    ├── Timeout                       deadline_exceeded  504
    ├── Unsupported                   unimplemented      501   this host lacks a capability
    │   └── MissingTool               unimplemented      501   a host program is not installed
    ├── CommandFailed                 internal           500   an external program failed
    ├── CorruptData                   data_loss          500   a snapshot/file failed verification
    └── Canceled                      canceled           499

Messages are written for the person reading them: say what was wrong and, where it helps, what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

__all__ = [
    "AlreadyExists",
    "Canceled",
    "CommandFailed",
    "Conflict",
    "CorruptData",
    "GuestError",
    "InUse",
    "InvalidArgument",
    "MissingTool",
    "NotFound",
    "NotRunning",
    "PermissionDenied",
    "QuotaExceeded",
    "StorageFull",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "Unsupported",
    "WrenboxError",
    "error_for_code",
]


class WrenboxError(Exception):
    """Base of every error wrenbox raises deliberately."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False
    """Trying again later can succeed (a limit, a component still starting): the API says when."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidArgument(WrenboxError):
    """The request itself is wrong (bad name, bad path, wrong type). Nothing was changed."""

    code = "invalid_argument"
    http_status = 400


class Unauthenticated(WrenboxError):
    """Missing or wrong API key / access token."""

    code = "unauthenticated"
    http_status = 401


class PermissionDenied(WrenboxError):
    """Authenticated, but not allowed to do this."""

    code = "permission_denied"
    http_status = 403


class NotFound(WrenboxError):
    """The named sandbox, template, file or process does not exist."""

    code = "not_found"
    http_status = 404


class Conflict(WrenboxError):
    """The target exists but is in a state that does not allow the operation."""

    code = "failed_precondition"
    http_status = 409


class AlreadyExists(Conflict):
    code = "already_exists"


class InUse(Conflict):
    """The target is still referenced (a template with sandboxes built on it, ...)."""


class NotRunning(Conflict):
    """The sandbox is not running (paused, pausing, stopped, ...)."""


class Unavailable(WrenboxError):
    """Try again later: a limit is reached or a component is not ready."""

    code = "unavailable"
    http_status = 503
    retryable = True


class GuestError(Unavailable):
    """The guest agent failed, or answered what the host refuses (too big, encoded, malformed). Its
    sandbox may be broken or hostile; retrying the same call will not help. ``guest_code``: the code the
    agent reported, if it reported one (the host may act on it; callers never see it as their own)."""

    http_status = 502
    retryable = False

    def __init__(self, message: str, guest_code: str | None = None) -> None:
        super().__init__(message)
        self.guest_code = guest_code


class QuotaExceeded(Unavailable):
    """A team holds all its quota allows (paused sandboxes, templates, bytes on disk): waiting does not
    help, freeing something does."""

    code = "resource_exhausted"
    http_status = 429
    retryable = False


class StorageFull(Unavailable):
    """The filesystem of the data dir has no room for what the operation writes (ENOSPC, EDQUOT). What
    was being written is thrown away and the sandbox stays as it was; the operator must free space (the
    caller cannot), after which the same request succeeds."""

    code = "resource_exhausted"
    http_status = 507
    retryable = False


class Timeout(WrenboxError):
    code = "deadline_exceeded"
    http_status = 504


class Unsupported(WrenboxError):
    """This host cannot do it (no KVM, no device-mapper, ...)."""

    code = "unimplemented"
    http_status = 501


class MissingTool(Unsupported):
    """A required host program is not installed; the message names the package providing it."""

    def __init__(self, tool: str, package: str) -> None:
        super().__init__(f"required program {tool!r} not found; install the Debian package {package!r}")
        self.tool = tool
        self.package = package


class CommandFailed(WrenboxError):
    """An external program exited non-zero (or could not be started)."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        shown = " ".join(argv)
        detail = stderr.strip() or "(no output)"
        status = "could not start" if returncode is None else f"exited {returncode}"
        super().__init__(f"{shown!r} {status}: {detail}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


class CorruptData(WrenboxError):
    """Stored data failed verification (checksum, size, format); it is refused, never served."""

    code = "data_loss"


class Canceled(WrenboxError):
    code = "canceled"
    http_status = 499


_BY_CODE: dict[str, type[WrenboxError]] = {
    cls.code: cls
    for cls in (
        WrenboxError,
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        Conflict,
        AlreadyExists,
        Unavailable,
        Timeout,
        Unsupported,
        CorruptData,
        Canceled,
    )
}
_BY_CODE["resource_exhausted"] = Unavailable
_BY_CODE["aborted"] = Conflict
_BY_CODE["out_of_range"] = InvalidArgument
_BY_CODE["unknown"] = WrenboxError


def error_for_code(code: str, message: str) -> WrenboxError:
    """Build the wrenbox error for a Connect / API error code (unknown codes become ``WrenboxError``)."""
    return _BY_CODE.get(code, WrenboxError)(message)
