"""Connect plumbing shared by the process and filesystem services."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from wrenbox.errors import InvalidArgument, WrenboxError

from .agent import Agent
from .auth import basic_auth_username
from .paths import error_from_os
from .users import User

__all__ = ["StreamClock", "acting_user", "connect_errors"]

KEEPALIVE_HEADER = "keepalive-ping-interval"


@contextlib.contextmanager
def connect_errors(path: str = "") -> Iterator[None]:
    """Turn wrenbox errors (and stray OSErrors) into Connect errors with the same code."""
    try:
        yield
    except WrenboxError as err:
        raise ConnectError(Code(err.code), err.message) from None
    except OSError as err:
        wrapped = error_from_os(err, path or err.filename or "")
        raise ConnectError(Code(wrapped.code), wrapped.message) from None
    except ValueError as err:  # e.g. "embedded null byte" from the os module
        raise ConnectError(Code.INVALID_ARGUMENT, str(err)) from None


def acting_user(agent: Agent, ctx: RequestContext) -> User:
    """The user named by the call's Basic authorization, else the sandbox's default user."""
    headers = {k.lower(): v for k, v in ctx.request_headers.items()}
    return agent.user_for(basic_auth_username(headers))


def require(value: object, what: str) -> None:
    if value is None:
        raise InvalidArgument(f"{what} is required")


class StreamClock:
    """When a server stream must send a keepalive, and when its deadline has passed.

    The deadline (``Connect-Timeout-Ms``) ends only the stream, never what it follows: a process or
    a watch outlives every client.
    """

    def __init__(self, ctx: RequestContext, default_keepalive: float) -> None:
        raw = ctx.request_headers.get(KEEPALIVE_HEADER)
        try:
            keepalive = float(raw) if raw else default_keepalive
        except ValueError:
            keepalive = default_keepalive
        self.keepalive = min(max(keepalive, 1.0), 3600.0)
        remaining = ctx.timeout_ms
        self._deadline = None if remaining is None else time.monotonic() + remaining / 1000

    def wait(self) -> float:
        """How long to wait for the next event before a keepalive (or the deadline) is due."""
        if self._deadline is None:
            return self.keepalive
        return max(0.0, min(self.keepalive, self._deadline - time.monotonic()))

    def expired(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())


def deadline_error(what: str) -> ConnectError:
    return ConnectError(Code.DEADLINE_EXCEEDED, f"the stream's deadline passed; {what}")
