"""A client of a wrenbox server (``wrenbox serve``): its REST API, and each sandbox's agent through the
server's proxy. What the ``wrenbox sandbox`` commands use; any Python program may too (E2B's SDK works
as well, this one just has no dependency beyond wrenbox's own).

    with ServerClient(ClientConfig.from_env()) as server:
        sb = server.create(template="base")
        async with server.agent(sb) as envd:          # wrenbox.envd.AsyncEnvdClient, routed by the proxy
            print((await envd.processes.exec("uname -a")).stdout)

``file_url`` makes a URL that downloads or uploads one file with no key or header (E2B's signed URLs,
routed by the server's proxy). Whoever holds one has that access, so wrenbox's URLs always expire: an
hour by default, at most a week, never "never" (E2B's SDK may leave the expiration out, and the agent
still accepts that, for the SDK's sake).

Errors are :mod:`wrenbox.errors`, rebuilt from the server's ``{"code", "message"}`` bodies by status
(the mapping the agent's client uses too).
``ClientConfig.from_env`` reads ``WRENBOX_URL`` (default ``http://127.0.0.1:3000``) and
``WRENBOX_API_KEY``.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import quote, urlencode

import httpx

from wrenbox.envd import ENVD_PORT, AsyncEnvdClient, EnvdConfig
from wrenbox.envd.connect import error_for_response
from wrenbox.errors import InvalidArgument, Timeout, Unauthenticated, Unavailable
from wrenbox.guest.auth import file_signature

__all__ = [
    "FILE_URL_LIFETIME_S",
    "MAX_FILE_URL_LIFETIME_S",
    "ClientConfig",
    "ServerClient",
    "ServerUnreachable",
]

DEFAULT_URL = "http://127.0.0.1:3000"
FILE_URL_LIFETIME_S = 3600
"""How long a :meth:`ServerClient.file_url` works unless the caller says otherwise."""
MAX_FILE_URL_LIFETIME_S = 7 * 24 * 3600
"""The longest one may work: long enough for any hand-over, short of "never"."""


class ServerUnreachable(Unavailable):
    """Nothing answered at the server's URL."""


@dataclass(frozen=True, slots=True)
class ClientConfig:
    url: str = DEFAULT_URL
    api_key: str | None = None
    timeout_s: float = 120.0  # creates, pauses and resumes take seconds under TCG

    @classmethod
    def from_env(cls, **overrides: Any) -> ClientConfig:
        fields: dict[str, Any] = {
            "url": os.environ.get("WRENBOX_URL", DEFAULT_URL),
            "api_key": os.environ.get("WRENBOX_API_KEY"),
        }
        return cls(**(fields | {k: v for k, v in overrides.items() if v is not None}))


class ServerClient:
    """The REST API of one server, for one key. Use as a context manager, or call :meth:`close`."""

    def __init__(self, config: ClientConfig) -> None:
        if not config.api_key:
            raise Unauthenticated("no API key: set WRENBOX_API_KEY (make one with `wrenbox keys create`)")
        self.config = config
        self._http = httpx.Client(
            base_url=config.url, headers={"X-API-KEY": config.api_key}, timeout=config.timeout_s
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- sandboxes -----------------------------------------------------------------------------------

    def create(
        self,
        *,
        template: str = "base",
        timeout_s: int | None = None,
        metadata: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        on_timeout: str = "kill",
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "templateID": template,
            "metadata": metadata or {},
            "envVars": env or {},
            "autoPause": on_timeout == "pause",
        }
        if timeout_s is not None:
            body["timeout"] = timeout_s
        return self._call("POST", "/v2/sandboxes", json=body)

    def list(
        self, *, state: str | None = None, metadata: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:

        params: dict[str, str] = {}
        if state:
            params["state"] = state
        if metadata:
            params["metadata"] = urlencode({quote(k): quote(v) for k, v in metadata.items()})
        out: list[dict[str, Any]] = []
        while True:
            response = self._send("GET", "/v2/sandboxes", params=params)
            out += response.json()
            token = response.headers.get("x-next-token")
            if not token:
                return out
            params["nextToken"] = token

    def get(self, sandbox_id: str) -> dict[str, Any]:
        return self._call("GET", f"/sandboxes/{sandbox_id}")

    def kill(self, sandbox_id: str) -> None:
        self._call("DELETE", f"/sandboxes/{sandbox_id}")

    def pause(self, sandbox_id: str, *, memory: bool = True) -> None:
        self._call("POST", f"/sandboxes/{sandbox_id}/pause", json={"memory": memory})

    def connect(
        self, sandbox_id: str, *, timeout_s: int | None = None, memory: bool = True
    ) -> dict[str, Any]:
        body: dict[str, Any] = {} if memory else {"memory": False}
        if timeout_s is not None:
            body["timeout"] = timeout_s
        return self._call("POST", f"/v2/sandboxes/{sandbox_id}/connect", json=body)

    def set_timeout(self, sandbox_id: str, timeout_s: int) -> None:
        self._call("POST", f"/sandboxes/{sandbox_id}/timeout", json={"timeout": timeout_s})

    def snapshot(self, sandbox_id: str, name: str | None = None) -> dict[str, Any]:
        return self._call("POST", f"/sandboxes/{sandbox_id}/snapshots", json={"name": name} if name else {})

    def fork(self, sandbox_id: str, count: int = 1) -> list[dict[str, Any]]:
        results = self._call("POST", f"/sandboxes/{sandbox_id}/fork", json={"count": count})
        return [r["sandbox"] for r in results]

    def logs(self, sandbox_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/sandboxes/{sandbox_id}/logs")["logEntries"]

    def metrics(self, sandbox_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/sandboxes/{sandbox_id}/metrics")

    # -- inside a sandbox ----------------------------------------------------------------------------

    def file_url(
        self,
        sandbox: dict[str, Any],
        path: str,
        *,
        write: bool = False,
        user: str | None = None,
        expires_in_s: int = FILE_URL_LIFETIME_S,
    ) -> str:
        """A URL that downloads ``path`` of ``sandbox`` (a create/connect/get answer) with a plain GET, or
        with ``write`` uploads to it (POST multipart/form-data), until ``expires_in_s`` seconds from now."""
        if not 0 < expires_in_s <= MAX_FILE_URL_LIFETIME_S:
            raise InvalidArgument(
                f"a file URL must expire within 1 to {MAX_FILE_URL_LIFETIME_S} s, not {expires_in_s}"
            )
        if not path:  # an unnamed upload would write wherever its form's filename says
            raise InvalidArgument("a file URL needs a path")
        token = sandbox.get("envdAccessToken")
        if not token:
            raise InvalidArgument(
                f"sandbox {sandbox.get('sandboxID')} has no access token, so its files have no signed URLs"
            )
        expiration = math.ceil(time.time()) + expires_in_s  # at least as long as asked
        signature = file_signature(path, "write" if write else "read", user or "", token, expiration)
        query = {"path": path, **({"username": user} if user else {})}
        query |= {"signature": signature, "signature_expiration": str(expiration)}
        return f"{self.config.url.rstrip('/')}/files?{urlencode(query, quote_via=quote)}"

    @asynccontextmanager
    async def agent(self, sandbox: dict[str, Any]):  # type: ignore[no-untyped-def]
        """The guest agent of ``sandbox`` (a create/connect/get answer), through the server's proxy."""
        headers = {"E2b-Sandbox-Id": sandbox["sandboxID"], "E2b-Sandbox-Port": str(ENVD_PORT)}
        config = EnvdConfig(
            self.config.url,
            access_token=sandbox.get("envdAccessToken"),
            headers=headers,
            exec_timeout=None,
            request_timeout=self.config.timeout_s,
        )
        async with AsyncEnvdClient(config) as client:
            yield client

    # -- plumbing ------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        return response.json() if response.content else None

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise ServerUnreachable(
                f"no wrenbox server at {self.config.url} (start one with `wrenbox serve`, or set WRENBOX_URL)"
            ) from None
        except httpx.TimeoutException:
            raise Timeout(f"{method} {path}: no answer from {self.config.url}") from None
        if response.is_success:
            return response
        what = f"{method} {path}"
        raise error_for_response(response.status_code, response.content, what, from_guest=False)
