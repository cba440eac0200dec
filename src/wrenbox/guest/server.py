"""Serving the agent: bind first (so the address can be printed at once), then run hypercorn.

Hypercorn serves HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on the same plain-TCP port, which is
what the e2b SDK needs: HTTP/2 by default, HTTP/1.1 with ``E2B_HTTP_VERSION=1.1`` and for downloads.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from .agent import Agent
from .app import AgentApp

__all__ = ["bind", "serve"]

log = logging.getLogger("wrenbox.guest")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: the kernel picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=512)


async def serve(agent: Agent, sock: socket.socket) -> None:
    """Serve until SIGTERM or SIGINT; then end every process the agent started."""
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    app = AgentApp(agent)  # it loads the RPC machinery in a thread once hypercorn starts up
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.accesslog = None
    config.loglevel = "WARNING"
    config.keep_alive_timeout = agent.config.keep_alive_timeout
    config.graceful_timeout = 1  # streams of running processes would otherwise hold up shutdown
    config.h2_max_concurrent_streams = 256
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    finally:
        agent.shutdown()
