"""The sandbox proxy: traffic for a sandbox's ports, on the API's own port, streamed both ways.

Which sandbox and port a request is for (E2B's rules, e2b-api.md §1.4-1.5), first match wins:

1. ``E2b-Sandbox-Id`` and ``E2b-Sandbox-Port`` headers (what the SDK sends to its sandbox URL);
2. a ``Host`` of ``<port>-<sandbox id>.<domain>`` (a browser, or ``get_host(port)``);
3. a header-less ``/files`` URL signed by a sandbox's access token (the SDK's ``download_url`` and
   ``upload_url``, fetched by any HTTP client): the sandbox whose token makes that signature.

Anything else is for the REST API. A request is held open through :meth:`Sandboxes.route`, so it
counts as activity, and when the sandbox pauses or stops the stream is cut at the transport level
(the connection is dropped mid-body), which is how E2B's SDK learns that a sandbox went away under a
running command. A sandbox that is not running answers 502 ``The sandbox was not found``; a closed guest
port 502 ``... port is not open`` (the SDK distinguishes the two). Bodies are passed as they are, never
buffered or re-encoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import struct
import urllib.parse
from dataclasses import dataclass
from typing import Any

import anyio
import h11
import httpx
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from wrenbox.api.websocket import GOING_AWAY, relay
from wrenbox.envd import ENVD_PORT
from wrenbox.errors import InvalidArgument, NotFound, NotRunning
from wrenbox.guest.auth import file_signature
from wrenbox.manager import Sandboxes
from wrenbox.records import SandboxState

__all__ = ["CutStream", "QuietCuts", "SandboxProxy", "Target"]

log = logging.getLogger(__name__)

_ID = re.compile(r"[a-z0-9]{1,64}")
# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the proxy sets itself.
_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    }
)
_MAX_POOLS = 64
NOT_FOUND = "The sandbox was not found"
PORT_CLOSED = "The sandbox is running but port is not open"


class CutStream(Exception):
    """The sandbox paused or stopped under a response already under way: drop the connection.

    Raising out of the ASGI app is how a server is told to close the connection mid-body; the server
    then logs an error, which :class:`QuietCuts` turns into one informational line. The connection is
    reset (RST), not closed in order (FIN): E2B's SDK reads a reset as "the connection died", asks
    ``/health`` and, on 502, reports that the sandbox was killed; an orderly close mid-body reads as a
    protocol error it does not look into.
    """


class QuietCuts(logging.Filter):
    """For the ASGI server's error log: a cut stream is the proxy working, not a failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, CutStream):
            record.msg, record.args, record.exc_info, record.exc_text = "stream cut: %s", (exc,), None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


@dataclass(frozen=True, slots=True)
class Target:
    sandbox_id: str
    port: int


class SandboxProxy:
    """The proxy half of the front door. ``target(scope)`` says whether a request is for a sandbox."""

    def __init__(self, sandboxes: Sandboxes, *, domain: str | None) -> None:
        self.sandboxes = sandboxes
        self.domain = domain
        # Keep-alive connections per sandbox and per run of it (Address.since): a pooled connection
        # must never outlive the VM it was opened to, or reach another sandbox on a reused address.
        self._pools: dict[str, tuple[float, httpx.AsyncClient]] = {}
        # The server's client connections by peer address (see http_protocol), to reset one on a cut.
        self._clients: dict[tuple[str, int], asyncio.Transport] = {}

    def http_protocol(self, head_timeout_s: float) -> type[H11Protocol]:
        """uvicorn's HTTP/1.1 protocol, telling this proxy which connection a request came on.

        It also closes a connection whose request head is not complete ``head_timeout_s`` after the
        connection opened (or after its last response): uvicorn has no such timer, and its keep-alive
        timer stops at the first byte, so a client dribbling a head (slowloris) would hold its
        connection forever. An idle connection between requests is left to the keep-alive timer."""
        clients = self._clients

        class Protocol(H11Protocol):
            _head_timer: asyncio.TimerHandle | None = None
            _head_started = False  # bytes of a request head arrived since the timer was armed
            _served = False

            def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
                super().connection_made(transport)
                peer = transport.get_extra_info("peername")
                if peer:
                    clients[(peer[0], peer[1])] = transport
                self._arm_head_timer()

            def connection_lost(self, exc: Exception | None) -> None:
                peer = self.transport.get_extra_info("peername")
                if peer:
                    clients.pop((peer[0], peer[1]), None)
                if self._head_timer is not None:
                    self._head_timer.cancel()
                super().connection_lost(exc)

            def data_received(self, data: bytes) -> None:
                if self.conn.their_state is h11.IDLE:
                    self._head_started = True
                super().data_received(data)

            def on_response_complete(self) -> None:
                super().on_response_complete()
                self._served = True
                self._arm_head_timer()

            def _arm_head_timer(self) -> None:
                if self._head_timer is not None:
                    self._head_timer.cancel()
                self._head_started = False
                self._head_timer = self.loop.call_later(head_timeout_s, self._head_overdue)

            def _head_overdue(self) -> None:
                self._head_timer = None
                if self.conn.their_state is h11.IDLE and (self._head_started or not self._served):
                    self.transport.close()

        return Protocol

    def _reset_on_close(self, scope: Scope) -> None:
        client = scope.get("client")
        transport = self._clients.get((client[0], client[1])) if client else None
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async def aclose(self) -> None:
        pools, self._pools = self._pools, {}
        for _, client in pools.values():
            await client.aclose()

    async def _pool(self, sandbox_id: str, since: float) -> httpx.AsyncClient:
        found = self._pools.get(sandbox_id)
        if found is not None and found[0] == since:
            return found[1]
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=5.0, read=None, write=None, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
            follow_redirects=False,
            trust_env=False,
        )
        self._pools[sandbox_id] = (since, client)
        if found is not None:
            # Its streams were cut when that run ended; idle connections lead to a VM that is gone.
            await found[1].aclose()
        if len(self._pools) > _MAX_POOLS:
            await self._drop_stopped()
        return client

    async def _drop_stopped(self) -> None:
        """Close the pools of sandboxes that no longer run."""
        running = {r.id for r in self.sandboxes.list(states={SandboxState.RUNNING})}
        for sandbox_id in set(self._pools) - running:
            _, client = self._pools.pop(sandbox_id)
            await client.aclose()

    # -- routing -------------------------------------------------------------------------------------

    def target(self, scope: Scope) -> Target | None:
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        by_header = self._by_header(headers)
        if by_header is not None:
            return by_header
        by_host = self._by_host(headers.get(b"host", b"").decode("latin-1"))
        if by_host is not None:
            return by_host
        if scope.get("path") == "/files" and b"x-api-key" not in headers:
            return self._by_signature(scope)
        return None

    def _by_header(self, headers: dict[bytes, bytes]) -> Target | None:
        sandbox_id = headers.get(b"e2b-sandbox-id")
        if sandbox_id is None:
            return None
        port = headers.get(b"e2b-sandbox-port", b"")
        return Target(sandbox_id.decode("latin-1"), int(port) if port.isdigit() else 0)

    def _by_host(self, host: str) -> Target | None:
        if not self.domain:
            return None
        host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        suffix = "." + self.domain
        if not host.endswith(suffix):
            return None
        port, dash, sandbox_id = host[: -len(suffix)].partition("-")
        if not dash or not port.isdigit() or not _ID.fullmatch(sandbox_id):
            return None
        return Target(sandbox_id, int(port))

    def _by_signature(self, scope: Scope) -> Target | None:
        query = dict(urllib.parse.parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        signature = query.get("signature")
        if not signature:
            return None
        op = "write" if scope.get("method") == "POST" else "read"
        raw_exp = query.get("signature_expiration")
        expiration = int(raw_exp) if raw_exp and raw_exp.isdigit() else None
        for rec in self.sandboxes.list(states={SandboxState.RUNNING, SandboxState.PAUSED}):
            if rec.access_token is None:
                continue
            made = file_signature(
                query.get("path", ""), op, query.get("username", ""), rec.access_token, expiration
            )
            if made == signature:
                return Target(rec.id, ENVD_PORT)
        return Target("", ENVD_PORT)  # signed, but by no sandbox here: not found, not the REST API

    # -- forwarding ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send, target: Target) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send, target)
            return
        started = False

        async def send_tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            async with self.sandboxes.route(target.sandbox_id, target.port) as address:
                client = await self._pool(target.sandbox_id, address.since)
                base = f"http://{address.host}:{address.port}"
                await self._forward(client, scope, receive, send_tracked, base)
        except (NotFound, NotRunning) as exc:
            if started:
                self._reset_on_close(scope)
                raise CutStream(str(exc)) from exc
            await _error(send, 502, NOT_FOUND, target.sandbox_id)
        except httpx.ConnectError:
            if started:
                raise
            await _error(send, 502, PORT_CLOSED, target.sandbox_id)
        except Exception as exc:
            if started:
                self._reset_on_close(scope)
                raise CutStream(str(exc)) from exc
            if isinstance(exc, InvalidArgument):
                await _error(send, 400, str(exc), target.sandbox_id)
                return
            log.warning("proxy to %s:%d failed: %r", target.sandbox_id, target.port, exc)
            await _error(send, 502, f"The sandbox did not answer: {type(exc).__name__}", target.sandbox_id)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, target: Target) -> None:
        accepted = False

        async def send_tracked(message: dict[str, Any]) -> None:
            nonlocal accepted
            accepted = accepted or message["type"] == "websocket.accept"
            await send(message)

        try:
            async with self.sandboxes.route(target.sandbox_id, target.port) as address:
                await relay(scope, receive, send_tracked, f"ws://{address.host}:{address.port}")
        except Exception as exc:  # not running, port closed, upgrade refused, or cut: close it
            if not accepted:
                log.info("websocket to %s:%d refused: %r", target.sandbox_id, target.port, exc)
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": GOING_AWAY if accepted else 1011})

    async def _forward(
        self, client: httpx.AsyncClient, scope: Scope, receive: Receive, send: Send, base: str
    ) -> None:
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        url = base + path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP]
        has_body = any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
        request = client.build_request(
            scope["method"], url, headers=headers, content=_body(receive) if has_body else None
        )
        response = await client.send(request, stream=True)
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()


async def _body(receive: Receive) -> Any:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _error(send: Send, status: int, message: str, sandbox_id: str) -> None:
    body = json.dumps({"sandboxId": sandbox_id, "message": message, "code": status}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
