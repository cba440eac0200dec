"""The front door: E2B's REST API, the sandbox proxy and API keys, as one ASGI app on one port.

Owns the wire (E2B's JSON shapes and status codes, :mod:`~wrenbox.api.wire`), who may call
(:mod:`~wrenbox.api.keys`), and how a request reaches a sandbox's port (:mod:`~wrenbox.api.proxy`). It
stands on the manager's face (:class:`wrenbox.manager.Sandboxes`) and nothing below it: never the runtime,
templates, VMM, network or disks (``tests/test_layers.py`` holds it to that).
"""

from wrenbox.api.app import FrontDoor, create_app
from wrenbox.api.keys import ApiKey, KeyStore, NewKey

__all__ = ["ApiKey", "FrontDoor", "KeyStore", "NewKey", "create_app"]
