"""The guest agent: the process inside every sandbox VM that speaks the envd protocol.

Run it as ``python -m wrenbox.guest --listen 127.0.0.1:49983``. It serves, on one port and over both
HTTP/1.1 and HTTP/2 with prior knowledge (h2c):

- Connect RPC services ``process.Process`` and ``filesystem.Filesystem`` (JSON and binary protobuf);
- plain HTTP: ``GET /health``, ``GET``/``POST /files``, ``POST /init``, ``GET /envs``, ``GET /metrics``.

Inside a TCG guest every import costs about ten times what it costs on the host, so this package keeps
its imports lean and loads the RPC machinery only after the socket is listening. It depends on nothing
but the standard library, ``wrenbox.errors``, ``wrenbox.proto``, connectrpc, protobuf-py and hypercorn:
the image builder installs exactly that into the guest.
"""
