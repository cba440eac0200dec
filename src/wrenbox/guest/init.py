"""``POST /init`` (the host hands the guest its identity and freshness) and ``GET /envs``.

After every restore the host calls /init: clones of one snapshot share the same RNG state and a stale
clock, so the host sends the wall-clock time (applied only if it moves the clock forward) and fresh
entropy (mixed into the kernel pool with RNDADDENTROPY, then RNDRESEEDCRNG). The same call sets the
environment for new processes, the default user and working directory, and the access token.

Body (JSON, every field optional; unknown fields are ignored)::

    {"envVars": {"K": "V"}, "accessToken": "...", "timestamp": "2026-11-28T14:00:00.123456789Z",
     "defaultUser": "user", "defaultWorkdir": "/home/user", "entropy": "<base64, at most 64 KiB>"}
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import struct
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from wrenbox.errors import InvalidArgument, Unauthenticated

if TYPE_CHECKING:
    from .agent import Agent

__all__ = ["HostClock", "InitRequest", "apply_init"]

log = logging.getLogger("wrenbox.guest")

# <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07)
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
MAX_ENTROPY = 64 * 1024


class HostClock:
    """The privileged kernel operations /init performs (tests substitute a recording fake)."""

    def now(self) -> float:
        return time.time()

    def set_clock(self, when: float) -> None:
        time.clock_settime(time.CLOCK_REALTIME, when)

    def add_entropy(self, data: bytes) -> None:
        import fcntl

        fd = os.open("/dev/random", os.O_WRONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
            fcntl.ioctl(fd, RNDRESEEDCRNG, 0)
        finally:
            os.close(fd)


@dataclass(frozen=True, slots=True)
class InitRequest:
    env_vars: dict[str, str]
    access_token: str | None
    timestamp: float | None
    default_user: str | None
    default_workdir: str | None
    entropy: bytes | None

    @classmethod
    def parse(cls, body: Any) -> InitRequest:
        """Validate everything before anything is applied: bad input changes nothing."""
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise InvalidArgument("the /init body must be a JSON object")
        return cls(
            env_vars=_env_vars(body.get("envVars")),
            access_token=_optional_str(body, "accessToken", allow_empty=False),
            timestamp=_timestamp(body.get("timestamp")),
            default_user=_optional_str(body, "defaultUser", allow_empty=False),
            default_workdir=_workdir(body.get("defaultWorkdir")),
            entropy=_entropy(body.get("entropy")),
        )


def apply_init(agent: Agent, request: InitRequest) -> None:
    user = None
    if request.default_user:
        try:
            user = agent.user_for(request.default_user)
        except Unauthenticated as err:  # in a request body it is bad input, not bad credentials
            raise InvalidArgument(err.message) from None
    host = agent.host
    if request.timestamp is not None and request.timestamp > host.now():
        try:
            host.set_clock(request.timestamp)
        except OSError as err:
            log.error("cannot set the clock: %s", err)
    if request.entropy:
        try:
            host.add_entropy(request.entropy)
        except OSError as err:
            log.error("cannot add entropy to the kernel pool: %s", err)
    agent.env_vars.update(request.env_vars)
    if user is not None:
        agent.default_user = user
    if request.default_workdir is not None:
        agent.default_workdir = request.default_workdir
    if request.access_token is not None:
        agent.access_token = request.access_token


def _optional_str(body: dict[str, Any], key: str, *, allow_empty: bool) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or (not value and not allow_empty) or "\0" in value:
        raise InvalidArgument(f"{key} must be a non-empty string")
    return value


def _env_vars(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidArgument("envVars must be an object of strings")
    for key, item in value.items():
        if not key or "=" in key or "\0" in key or "\0" in item:
            raise InvalidArgument(f"invalid environment variable name {key!r}")
    return dict(value)


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument("timestamp must be an RFC 3339 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(f"timestamp {value!r} is not RFC 3339") from None
    if parsed.tzinfo is None:
        raise InvalidArgument("timestamp needs a time zone (e.g. a trailing 'Z')")
    return parsed.timestamp()


def _workdir(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or len(value) > 4096:
        raise InvalidArgument("defaultWorkdir must be an absolute path")
    return os.path.normpath(value)


def _entropy(value: Any) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument("entropy must be a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise InvalidArgument("entropy is not valid base64") from None
    if len(data) > MAX_ENTROPY:
        raise InvalidArgument(f"entropy is larger than {MAX_ENTROPY} bytes")
    return data
