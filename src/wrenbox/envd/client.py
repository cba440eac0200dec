"""The async client of one guest agent (envd).

Create one :class:`AsyncEnvdClient` per agent and keep it for as long as the sandbox is in use: it
holds the connection pool, so calls reuse kept-alive connections instead of paying for a new one::

    async with AsyncEnvdClient(EnvdConfig(base_url="http://10.11.0.2:49983")) as envd:
        await envd.wait_healthy()
        await envd.init(env_vars={"LANG": "C.UTF-8"}, access_token=token)
        result = await envd.processes.exec("echo hi")
        await envd.files.upload("/home/user/data.bin", Path("data.bin"))

``envd.processes`` (:class:`~wrenbox.envd.processes.AsyncProcesses`) and ``envd.files``
(:class:`~wrenbox.envd.files.AsyncFiles`) hold the operations; the agent-wide ones are here.
Everything raises :mod:`wrenbox.errors`.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Self

import anyio
import httpx

from wrenbox.envd.channel import Channel
from wrenbox.envd.connect import envelope
from wrenbox.envd.endpoint import EnvdConfig
from wrenbox.envd.files import AsyncFiles
from wrenbox.envd.models import Metrics
from wrenbox.envd.processes import AsyncProcesses
from wrenbox.errors import GuestError, InvalidArgument, Timeout, Unavailable

__all__ = ["ENTROPY_BYTES", "AsyncEnvdClient"]

ENTROPY_BYTES: Final = 64
"""Host randomness sent with every ``init`` to reseed the guest CRNG (clones share its state)."""


class AsyncEnvdClient:
    """Talks to one guest agent. Use it as an async context manager, or call :meth:`aclose`.

    ``transport`` is the routing seam (see :mod:`wrenbox.envd.channel`).
    """

    def __init__(
        self, config: EnvdConfig | None = None, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.config = config or EnvdConfig()
        self._channel = Channel(self.config, transport)
        self.processes = AsyncProcesses(self._channel)
        self.files = AsyncFiles(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._channel.aclose()

    async def wait_healthy(self, timeout: float = 30.0, interval: float = 0.1) -> None:
        """Poll ``/health`` every ``interval`` s until the agent answers; :class:`Timeout` after
        ``timeout`` s."""
        deadline = anyio.current_time() + timeout
        last = "no answer"
        while True:
            remaining = deadline - anyio.current_time()
            try:
                await self._channel.request(
                    "GET", "/health", timeout=max(min(remaining, 2.0), 0.001), ok=(200, 204)
                )
                return
            except (Unavailable, Timeout) as exc:
                last = exc.message
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                raise Timeout(f"envd at {self.config.base_url} not healthy within {timeout:g} s ({last})")
            await anyio.sleep(min(interval, remaining))

    async def initialised(self) -> bool:
        """True if the agent demands an access token (it went through an ``/init`` that set one); False
        for an agent that started afresh and serves anyone (e.g. restarted by the guest's init)."""
        # A token nobody has: refused by an agent that has one, accepted by one that has none.
        answer = await self._channel.request("GET", "/envs", headers={"X-Access-Token": "-"}, ok=(200, 401))
        return answer.status == 401

    async def init(
        self,
        *,
        env_vars: Mapping[str, str] | None = None,
        access_token: str | None = None,
        default_user: str | None = None,
        default_workdir: str | None = None,
        timestamp: datetime | None = None,
        entropy: bytes | None = None,
    ) -> None:
        """Prepare the agent for a fresh or restored sandbox: set its clock to ``timestamp``
        (default: now), reseed its CRNG with ``entropy`` (default: :data:`ENTROPY_BYTES` fresh host
        random bytes), set the env vars every process gets and the default user and workdir.

        With ``access_token`` the agent demands that token from now on, and this client sends it.
        """
        if timestamp is not None and timestamp.utcoffset() is None:
            raise InvalidArgument("init timestamp must be timezone-aware (e.g. datetime.now(UTC))")
        body: dict[str, Any] = {
            "timestamp": (timestamp or datetime.now(UTC)).isoformat(),
            "entropy": base64.b64encode(entropy or os.urandom(ENTROPY_BYTES)).decode(),
        }
        optional = {
            "envVars": dict(env_vars) if env_vars is not None else None,
            "accessToken": access_token,
            "defaultUser": default_user,
            "defaultWorkdir": default_workdir,
        }
        body.update({key: value for key, value in optional.items() if value is not None})
        await self._channel.request("POST", "/init", json=body, ok=(200, 204))
        if access_token:
            self._channel.set_access_token(access_token)

    async def warm_up(self) -> None:
        """Run once what E2B's SDK sends, in its encodings (Connect JSON, streamed and unary; ``/files``)
        so those code paths are loaded and warm in a template's memory: a sandbox's first SDK command
        then costs what every later one does (under TCG a cold JSON path costs about 150 ms)."""
        start = json.dumps({"process": {"cmd": "/bin/true", "args": []}}).encode()
        stream_headers = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"}
        unary_headers = {"Content-Type": "application/json", "Connect-Protocol-Version": "1"}
        calls = [
            ("POST", "/process.Process/Start", envelope(start), stream_headers),
            ("POST", "/process.Process/List", b"{}", unary_headers),
            ("POST", "/filesystem.Filesystem/Stat", b'{"path": "/"}', unary_headers),
            ("GET", "/files?path=/etc/hostname", b"", {}),
        ]
        for method, path, body, headers in calls:
            await self._channel.request(method, path, content=body, headers=headers)

    async def envs(self) -> dict[str, str]:
        """The environment variables the agent gives every process by default."""
        data = await self._channel.get_json("/envs")
        return {str(key): str(value) for key, value in data.items()}

    async def metrics(self) -> Metrics:
        """The guest's CPU, memory and disk use."""
        data = await self._channel.get_json("/metrics")
        try:
            return Metrics.from_json(data)
        except (ValueError, TypeError, LookupError) as exc:
            raise GuestError(
                f"GET /metrics: unexpected answer from the agent ({type(exc).__name__})"
            ) from exc
