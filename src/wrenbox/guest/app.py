"""The agent's ASGI application: access control, CORS, and routing to the endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from wrenbox.errors import NotFound, Unauthenticated, WrenboxError

from .agent import Agent
from .asgi import (
    BodyStalled,
    Message,
    Receive,
    Request,
    Scope,
    Send,
    send_error,
    send_json,
    send_status,
    stall_limited,
)
from .auth import check_token, verify_file_signature

if TYPE_CHECKING:
    from .metrics import MetricsSampler
    from .services import RpcRouter

__all__ = ["AgentApp"]

log = logging.getLogger("wrenbox.guest")

RPC_PREFIXES = ("/process.Process/", "/filesystem.Filesystem/")
# A client stream: its body is the process's input, which may rightly pause for any time.
UNLIMITED_BODIES = frozenset({"/process.Process/StreamInput"})
CORS_HEADERS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-expose-headers", b"*"),
]
PREFLIGHT_HEADERS = [
    *CORS_HEADERS,
    (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
    (b"access-control-allow-headers", b"*"),
    (b"access-control-max-age", b"7200"),
]


# Everything but the router loads after the server is up, in a thread: /health answers meanwhile.
LAZY_MODULES = ("wrenbox.guest.files", "wrenbox.guest.init", "wrenbox.guest.metrics")


class AgentApp:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._metrics: MetricsSampler | None = None
        self._rpc: RpcRouter | None = None
        self._rpc_loading: asyncio.Future[object] | None = None

    def preload(self) -> None:
        """Start importing the RPC machinery (and the other endpoints) in a thread."""
        if self._rpc_loading is None:
            loop = asyncio.get_running_loop()
            self._rpc_loading = loop.run_in_executor(
                None, _import_all, "wrenbox.guest.services", *LAZY_MODULES
            )

    async def rpc(self) -> RpcRouter:
        if self._rpc is None:
            self.preload()
            assert self._rpc_loading is not None
            module = await asyncio.shield(self._rpc_loading)
            if self._rpc is None:
                self._rpc = module.RpcRouter(self.agent)  # type: ignore[attr-defined]
        return self._rpc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, on_startup=self.preload)
            return
        if scope["type"] != "http":
            return  # no websockets here
        send = _with_cors(send)
        if scope["path"] not in UNLIMITED_BODIES:
            stalled = _rpc_stalled if scope["path"].startswith(RPC_PREFIXES) else BodyStalled
            receive = stall_limited(receive, self.agent.config.body_timeout, stalled)
        request = Request(scope, receive)
        log.debug(
            "%s %s HTTP/%s accept-encoding=%s",
            request.method,
            request.path,
            scope.get("http_version"),
            request.headers.get("accept-encoding"),
        )
        try:
            await self._dispatch(request, receive, send)
        except WrenboxError as err:
            if request.path.startswith(RPC_PREFIXES):  # a Connect error body, which Connect clients parse
                await send_json(send, err.http_status, err.to_dict())
            else:
                await send_error(send, err)
        except ConnectionResetError:  # the client left mid-request (see Request.body_chunks)
            log.info("%s %s: the client left before its request was complete", request.method, request.path)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            # The response may have started already; then the connection just ends.
            with contextlib.suppress(Exception):
                await send_error(send, WrenboxError("internal error in the agent"))

    async def _dispatch(self, request: Request, receive: Receive, send: Send) -> None:
        method, path = request.method, request.path
        if method == "OPTIONS":
            await send_status(send, 204, PREFLIGHT_HEADERS)
            return
        if method == "GET" and path == "/health":
            await send_status(send, 204)
            return
        self._authorize(request)
        if path.startswith(RPC_PREFIXES):
            await (await self.rpc())(request.scope, receive, send)
        elif path == "/files" and method in ("GET", "POST"):
            from . import files

            await (files.download if method == "GET" else files.upload)(self.agent, request, send)
        elif path == "/init" and method == "POST":
            from .init import InitRequest, apply_init

            apply_init(self.agent, InitRequest.parse(await request.json()))
            await send_status(send, 204, [(b"cache-control", b"no-store")])
        elif path == "/envs" and method == "GET":
            await send_json(send, 200, self.agent.env_vars)
        elif path == "/metrics" and method == "GET":
            if self._metrics is None:
                from .metrics import MetricsSampler

                self._metrics = MetricsSampler()
            await send_json(send, 200, self._metrics.sample())
        else:
            raise NotFound(f"no endpoint {method} {path}")

    def _authorize(self, request: Request) -> None:
        token = self.agent.access_token
        if check_token(token, request.headers):
            return
        assert token is not None
        if request.path == "/files" and "x-access-token" not in request.headers:
            operation = "read" if request.method == "GET" else "write"
            verify_file_signature(token, request.query, operation)
            return
        raise Unauthenticated("missing or wrong X-Access-Token")


def _rpc_stalled(message: str) -> Exception:
    # Raised inside connectrpc's body reader, so it must be its error type to become a Connect answer.
    from connectrpc.code import Code
    from connectrpc.errors import ConnectError

    return ConnectError(Code.CANCELED, message)


def _import_all(first: str, *more: str) -> object:
    module = importlib.import_module(first)
    for name in more:
        importlib.import_module(name)
    return module


def _with_cors(send: Send) -> Send:
    async def send_with_cors(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *CORS_HEADERS]
        await send(message)

    return send_with_cors


async def _lifespan(receive: Receive, send: Send, on_startup: Callable[[], None]) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            on_startup()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
