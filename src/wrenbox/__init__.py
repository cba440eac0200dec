"""wrenbox: self-hosted microVM sandboxes for running untrusted code.

This package is also imported inside every guest VM (``wrenbox.guest``), where each import costs about
ten times what it costs on the host. Keep this module free of imports.
"""

__version__ = "0.1.0"
