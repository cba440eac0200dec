"""The Connect RPC applications. Imported lazily (off the event loop) because connectrpc, protobuf-py
and the generated modules are the bulk of the agent's import time."""

from __future__ import annotations

from wrenbox.proto.filesystem.filesystem_connect import FilesystemASGIApplication
from wrenbox.proto.process.process_connect import ProcessASGIApplication

from .agent import Agent
from .asgi import Receive, Scope, Send
from .filesystem import FilesystemService
from .process_service import ProcessService

__all__ = ["RpcRouter"]


class RpcRouter:
    """Dispatches ``/process.Process/*`` and ``/filesystem.Filesystem/*`` to their applications."""

    def __init__(self, agent: Agent) -> None:
        self._apps = {
            "/process.Process/": ProcessASGIApplication(ProcessService(agent)),
            "/filesystem.Filesystem/": FilesystemASGIApplication(FilesystemService(agent)),
        }

    def handles(self, path: str) -> bool:
        return any(path.startswith(prefix) for prefix in self._apps)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for prefix, app in self._apps.items():
            if scope["path"].startswith(prefix):
                await app(scope, receive, send)  # type: ignore[arg-type]
                return
