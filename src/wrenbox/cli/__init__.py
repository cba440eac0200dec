"""The ``wrenbox`` command line. Commands are thin: parse, call the library (or the server), render.

``app`` holds the host commands (doctor, image, template, demo); ``server`` adds ``serve`` and ``keys``;
``sandbox`` the ``sandbox`` commands, a client of a running server.
"""

from wrenbox.cli import sandbox as _sandbox  # noqa: F401  (registers its commands on ``app``)
from wrenbox.cli import server as _server  # noqa: F401
from wrenbox.cli.app import app, main

__all__ = ["app", "main"]
