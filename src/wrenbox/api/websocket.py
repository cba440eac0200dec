"""WebSocket pass-through for the sandbox proxy: a client's WebSocket relayed, message by message, to the
same path on a guest port (a user's app in the sandbox: Jupyter, a dev server's live reload, ...).

The upgrade is made to the guest first; only when the guest accepted is the client accepted (with the
subprotocol and the headers the guest answered), so a closed port or a refused upgrade closes the
client's socket with 1011 before it opened. Either side closing closes the other.
"""

from __future__ import annotations

from typing import Any

import anyio
import websockets
from starlette.types import Receive, Scope, Send

__all__ = ["relay"]

# Headers the upgrade itself is made of (the guest's upgrade makes its own) and hop-by-hop ones.
_OWN = frozenset(
    {
        "host",
        "connection",
        "upgrade",
        "content-length",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
GOING_AWAY = 1001


async def relay(scope: Scope, receive: Receive, send: Send, base: str) -> None:
    """Relay the client's WebSocket in ``scope`` to ``base`` (``ws://host:port``) until one side closes."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    query = scope.get("query_string", b"").decode("latin-1")
    url = base + path + ("?" + query if query else "")
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
    async with websockets.connect(
        url,
        additional_headers=[(k, v) for k, v in headers if k.lower() not in _OWN],
        subprotocols=scope.get("subprotocols") or None,  # type: ignore[arg-type]
        open_timeout=10,
        max_size=None,
        compression=None,  # passed as they are, never re-encoded
        user_agent_header=None,
    ) as upstream:
        answered = [
            (k.lower().encode("latin-1"), v.encode("latin-1"))
            for k, v in upstream.response.headers.raw_items()
            if k.lower() not in _OWN
        ]
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol, "headers": answered})
        async with anyio.create_task_group() as tg:
            tg.start_soon(_down, upstream, send, tg.cancel_scope)
            await _up(receive, upstream)
            tg.cancel_scope.cancel()


async def _up(receive: Receive, upstream: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            await upstream.close()
            return
        if message["type"] == "websocket.receive":
            data = message.get("bytes")
            await upstream.send(data if data is not None else message.get("text", ""))


async def _down(upstream: Any, send: Send, scope: anyio.CancelScope) -> None:
    try:
        async for message in upstream:
            key = "bytes" if isinstance(message, bytes) else "text"
            await send({"type": "websocket.send", key: message})
    except websockets.ConnectionClosed:
        pass
    await send({"type": "websocket.close", "code": upstream.close_code or 1000})
    scope.cancel()
