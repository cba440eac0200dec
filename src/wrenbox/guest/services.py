"""The Connect RPC applications. Imported lazily (off the event loop) because connectrpc, protobuf-py
and the generated modules are the bulk of the agent's import time."""

from __future__ import annotations

from connectrpc.code import Code
from connectrpc.codec import Codec, proto_binary_codec, proto_json_codec
from connectrpc.errors import ConnectError
from protobuf import Message

from wrenbox.proto.filesystem.filesystem_connect import FilesystemASGIApplication
from wrenbox.proto.process.process_connect import ProcessASGIApplication

from .agent import Agent
from .asgi import Receive, Scope, Send, send_status
from .filesystem import FilesystemService
from .framing import guard_envelopes
from .process_service import ProcessService

__all__ = ["RpcRouter"]


class RpcRouter:
    """Dispatches ``/process.Process/*`` and ``/filesystem.Filesystem/*`` to their applications."""

    def __init__(self, agent: Agent) -> None:
        codecs = [_StrictCodec(proto_binary_codec()), _StrictCodec(proto_json_codec())]
        self._apps = {
            "/process.Process/": ProcessASGIApplication(ProcessService(agent), codecs=codecs),
            "/filesystem.Filesystem/": FilesystemASGIApplication(FilesystemService(agent), codecs=codecs),
        }

    def handles(self, path: str) -> bool:
        return any(path.startswith(prefix) for prefix in self._apps)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _needs_trailers(scope) and "http.response.trailers" not in scope.get("extensions", {}):
            # gRPC proper over HTTP/1.1: connectrpc would fail with a 500 after reading the request.
            await send_status(send, 415, [(b"accept-post", b"application/connect+proto, application/proto")])
            return
        for prefix, app in self._apps.items():
            if scope["path"].startswith(prefix):
                await app(scope, guard_envelopes(scope, receive), send)  # type: ignore[arg-type]
                return


def _needs_trailers(scope: Scope) -> bool:
    content_type = dict(scope.get("headers", ())).get(b"content-type", b"").lower()
    return content_type.startswith(b"application/grpc") and not content_type.startswith(
        b"application/grpc-web"
    )


class _StrictCodec:
    """connectrpc's JSON/binary codec, but an undecodable request is the client's error (400), not 500."""

    def __init__(self, inner: Codec) -> None:
        self._inner = inner

    def name(self) -> str:
        return self._inner.name()

    def encode(self, message: Message) -> bytes:
        return self._inner.encode(message)

    def decode(self, data: bytes | bytearray, message_class: type[Message]) -> Message:
        try:
            return self._inner.decode(data, message_class)
        except ConnectError:
            raise
        except Exception as err:
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"cannot decode {message_class.__name__}: {err}"
            ) from None
