"""The one connection to one agent that every part of the client sends its requests through.

It owns the ``httpx.AsyncClient`` (so the connection pool and kept-alive connections live as long as
the client), knows the config's deadlines, and names the user of each call the way the agent wants
it. The transport seam is here: an optional ``httpx.AsyncBaseTransport`` plus ``base_url`` and
``headers`` from :class:`EnvdConfig` decide where requests go (the guest at ``<host_ip>:49983``, a
proxy in front of it, or an in-process app in tests).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
from protobuf import Message

from wrenbox.envd import connect
from wrenbox.envd.connect import Answer, Rpc, ServerStream, error_for_response
from wrenbox.envd.endpoint import EnvdConfig
from wrenbox.envd.limits import MAX_ERROR_BODY
from wrenbox.errors import InvalidArgument

__all__ = ["Channel"]


class Channel:
    def __init__(self, config: EnvdConfig, transport: httpx.AsyncBaseTransport | None) -> None:
        self.config = config
        headers = {"Accept-Encoding": "identity", **config.headers}  # no gzip of bytes on a local link
        if config.access_token:
            headers["X-Access-Token"] = config.access_token
        self.http = httpx.AsyncClient(
            base_url=config.base_url,
            headers=headers,
            http1=not config.http2,
            http2=config.http2,
            transport=transport,
            # Deadlines are anyio scopes around whole calls; httpx itself only bounds connecting.
            timeout=httpx.Timeout(None, connect=config.connect_timeout),
        )
        # File transfers have no total deadline; the request timeout bounds each silence instead.
        self.transfer_timeout = httpx.Timeout(config.request_timeout, connect=config.connect_timeout)
        # The agent sends a keepalive on quiet streams every interval; three missed ones mean it is gone.
        self._stream_idle = 3 * config.keepalive_interval
        self._keepalive = {"Keepalive-Ping-Interval": str(config.keepalive_interval)}

    async def aclose(self) -> None:
        await self.http.aclose()

    def set_access_token(self, token: str) -> None:
        self.http.headers["X-Access-Token"] = token

    async def unary(self, rpc: Rpc[Any, Any], request: Message, user: str | None = None) -> Any:
        return await connect.unary(
            self.http, rpc, request, headers=self.auth(user), timeout=self.config.request_timeout
        )

    def stream_opener(
        self, rpc: Rpc[Any, Any], request: Message, user: str | None
    ) -> Callable[[], AbstractAsyncContextManager[ServerStream[Any]]]:
        headers = {**self.auth(user), **self._keepalive}
        return lambda: connect.server_stream(
            self.http, rpc, request, headers=headers, idle_timeout=self._stream_idle
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        limit: int = MAX_ERROR_BODY,
        timeout: float | None = None,
        ok: tuple[int, ...] = (200,),
        **kwargs: Any,
    ) -> Answer:
        """One plain HTTP call whose whole answer (at most ``limit`` bytes) is read within ``timeout``
        (default: the config's request timeout); any status but ``ok`` raises the agent's error."""
        what = f"{method} {path}"
        request = self.http.build_request(method, path, **kwargs)
        answer = await connect.exchange(
            self.http, request, what=what, limit=limit, timeout=timeout or self.config.request_timeout
        )
        if answer.status not in ok:
            raise error_for_response(answer.status, answer.body, what)
        return answer

    async def get_json(self, path: str) -> dict[str, Any]:
        return (await self.request("GET", path)).json_object(f"GET {path}")

    def user(self, user: str | None) -> str | None:
        return user if user is not None else self.config.user

    def auth(self, user: str | None) -> dict[str, str]:
        """Connect calls name their user in HTTP Basic auth (user name, empty password)."""
        name = self.user(user)
        if not name:
            return {}
        return {"Authorization": "Basic " + base64.b64encode(f"{name}:".encode()).decode()}

    def file_params(self, path: str, user: str | None) -> dict[str, str]:
        """``/files`` names the path and the user in the query string."""
        if not path:
            raise InvalidArgument("a file path is required")
        name = self.user(user)
        return {"path": path, "username": name} if name else {"path": path}
