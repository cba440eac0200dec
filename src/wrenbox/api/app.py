"""The front door as one ASGI application: E2B's REST API and the sandbox proxy on one port.

:class:`FrontDoor` looks at each request once: if it is for a sandbox (see :mod:`wrenbox.api.proxy`) it
is streamed there; everything else goes to the REST API, a FastAPI app whose OpenAPI document is served
at ``/openapi.json``. ``GET /health`` (when not for a sandbox) and ``GET /metrics`` (Prometheus text:
sandboxes by state, request latencies and errors) need no key.

The app holds no sandboxes of its own: it is given a :class:`~wrenbox.manager.Sandboxes` (and keys) by
whoever runs it (:func:`wrenbox.service.serve`, or a test).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Receive, Scope, Send

from wrenbox.api import errors
from wrenbox.api import sandboxes as sandbox_routes
from wrenbox.api import templates as template_routes
from wrenbox.api.context import ApiContext
from wrenbox.api.keys import KeyStore
from wrenbox.api.proxy import SandboxProxy
from wrenbox.api.sampler import MetricsSampler
from wrenbox.api.wire import Wire
from wrenbox.manager import Sandboxes
from wrenbox.records import SandboxState

__all__ = ["FrontDoor", "create_app"]

log = logging.getLogger(__name__)


class _Telemetry:
    """The server's own metrics, in a registry of its own (two apps in one process do not collide)."""

    def __init__(self, sandboxes: Sandboxes) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "wrenbox_api_requests",
            "REST requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "wrenbox_api_request_seconds",
            "REST request latency by route",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.proxied = Counter(
            "wrenbox_proxy_requests",
            "Proxied sandbox requests by outcome",
            ["outcome"],
            registry=self.registry,
        )
        states = Gauge("wrenbox_sandboxes", "Sandboxes by state", ["state"], registry=self.registry)
        for state in SandboxState:
            if state is not SandboxState.DESTROYED:
                states.labels(state.value).set_function(
                    lambda s=state: len(sandboxes.list(states={s}))  # type: ignore[misc]
                )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class FrontDoor:
    """Sends each request to the sandbox proxy or the REST API."""

    def __init__(
        self, rest: ASGIApp, proxy: SandboxProxy, telemetry: _Telemetry, *, head_timeout_s: float
    ) -> None:
        self.rest = rest
        self.proxy = proxy
        self.telemetry = telemetry
        # uvicorn's protocol class for this app (``uvicorn.Config(http=...)``): it lets the proxy reset
        # the connection of a stream it cuts, and cuts connections whose request head never completes.
        self.http_protocol = proxy.http_protocol(head_timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            target = self.proxy.target(scope)
            if target is not None:
                outcome = "ok"
                try:
                    await self.proxy(scope, receive, send, target)
                except BaseException:
                    outcome = "cut"
                    raise
                finally:
                    self.telemetry.proxied.labels(outcome).inc()
                return
        await self.rest(scope, receive, send)


def create_app(
    sandboxes: Sandboxes,
    keys: KeyStore,
    *,
    domain: str | None = None,
    disk_mb: int = 10 * 1024,
    metrics_interval_s: float = 5.0,
    head_timeout_s: float = 20.0,
) -> FrontDoor:
    """The server's ASGI app over ``sandboxes``. Its lifespan runs the metrics sampler."""
    sampler = MetricsSampler(sandboxes, interval_s=metrics_interval_s)
    proxy = SandboxProxy(sandboxes, domain=domain)
    telemetry = _Telemetry(sandboxes)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler.run)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                await proxy.aclose()

    rest = FastAPI(
        title="wrenbox",
        summary="E2B's sandbox API, self-hosted",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    rest.state.ctx = ApiContext(sandboxes, keys, Wire(domain=domain, disk_mb=disk_mb), sampler)
    errors.install(rest)
    rest.include_router(sandbox_routes.router)
    rest.include_router(template_routes.router)

    @rest.middleware("http")
    async def measure(request: Request, call_next):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        telemetry.latency.labels(request.method, name).observe(time.perf_counter() - start)
        telemetry.requests.labels(request.method, name, str(response.status_code)).inc()
        return response

    @rest.get("/health", tags=["server"], summary="The server is up")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @rest.get("/metrics", tags=["server"], summary="Prometheus metrics of the server")
    def metrics() -> Response:
        return Response(telemetry.render(), media_type=CONTENT_TYPE_LATEST)

    return FrontDoor(rest, proxy, telemetry, head_timeout_s=head_timeout_s)
