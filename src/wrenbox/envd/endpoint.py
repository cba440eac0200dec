"""How an envd client reaches one guest agent, and its defaults."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import urlsplit

from wrenbox.errors import InvalidArgument

__all__ = ["ENVD_PORT", "EnvdConfig"]

ENVD_PORT = 49983
"""The port the guest agent listens on inside every sandbox."""


@dataclass(frozen=True, slots=True)
class EnvdConfig:
    """Where the agent is and how to talk to it. Invalid values raise :class:`InvalidArgument`.

    ``base_url``
        ``http://<host_ip>:49983`` for a sandbox, or the address of a proxy in front of it.
    ``access_token``
        Sent as ``X-Access-Token``; the agent demands it once ``/init`` set one.
    ``user``
        Default user for commands and files (``None``: the agent's default user).
    ``request_timeout``
        Deadline of every short call (unary RPCs, ``/init``, ``/envs``, ...) and the longest silence
        tolerated inside a file transfer. ``None`` waits forever.
    ``connect_timeout``
        Bound on opening a TCP connection to the agent.
    ``exec_timeout``
        Default deadline of :meth:`~wrenbox.envd.AsyncEnvdClient.exec`; at the deadline the process
        is killed. ``None`` waits forever.
    ``min_transfer_rate``
        Bytes per second a file transfer must average after its first ``request_timeout`` seconds; a
        guest that trickles slower is cut off (each silence is also bounded by ``request_timeout``).
    ``output_cap``
        Default bytes of stdout and of stderr kept by ``exec``; the rest is read and dropped.
    ``keepalive_interval``
        Seconds between the keepalive events the agent sends on idle streams.
    ``http2``
        Speak HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    ``headers``
        Extra headers on every request, e.g. the routing headers of a proxy.
    """

    base_url: str = f"http://127.0.0.1:{ENVD_PORT}"
    access_token: str | None = None
    user: str | None = None
    request_timeout: float | None = 30.0
    connect_timeout: float = 5.0
    exec_timeout: float | None = 60.0
    min_transfer_rate: float = 64 * 1024
    output_cap: int = 16 * 1024 * 1024
    keepalive_interval: int = 30
    http2: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise InvalidArgument(
                f"envd base_url must be http(s)://host[:port][/prefix], got {self.base_url!r}"
            )
        for name in ("request_timeout", "exec_timeout"):
            _check_positive(name, getattr(self, name), optional=True)
        _check_positive("connect_timeout", self.connect_timeout, optional=False)
        if not self.min_transfer_rate > 0:
            raise InvalidArgument(f"min_transfer_rate must be > 0 bytes/s, got {self.min_transfer_rate}")
        if self.output_cap < 0:
            raise InvalidArgument(f"output_cap must be >= 0, got {self.output_cap}")
        if self.keepalive_interval < 1:
            raise InvalidArgument(f"keepalive_interval must be >= 1 s, got {self.keepalive_interval}")
        for key, value in self.headers.items():
            if not isinstance(key, str) or not isinstance(value, str) or "\n" in key + value:
                raise InvalidArgument(f"invalid header {key!r}: {value!r}")
        # Frozen all the way down: nobody edits the headers of a config others hold.
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))


def _check_positive(name: str, value: float | None, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"{name} must be a positive number of seconds, got {value!r}")
