"""Validation and generation of every name that becomes a path, a device name or a socket name.

Anything a user hands us that ends up on the file system or in a kernel object name goes through one
of these functions first; they raise :class:`~wrenbox.errors.InvalidArgument` and never touch anything.
"""

from __future__ import annotations

import re
import secrets
import string

from wrenbox.errors import InvalidArgument

__all__ = ["new_sandbox_id", "validate_name", "validate_sandbox_id"]

# The seed's safe-name rule: 1-64 chars, first alphanumeric, then [A-Za-z0-9._-].
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Sandbox ids appear in DNS labels (<port>-<id>.<domain>), so lowercase alphanumerics only.
_SANDBOX_ID = re.compile(r"[a-z0-9]{4,40}")
_ID_ALPHABET = string.ascii_lowercase + string.digits
_ID_LENGTH = 20


def validate_name(name: object, *, what: str = "name") -> str:
    """Return ``name`` if it is a safe template/snapshot name, else raise InvalidArgument."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid {what} {name!r}: use 1-64 characters, letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def validate_sandbox_id(sandbox_id: object) -> str:
    """Return ``sandbox_id`` if it has the shape of a wrenbox sandbox id, else raise InvalidArgument."""
    if not isinstance(sandbox_id, str) or not _SANDBOX_ID.fullmatch(sandbox_id):
        raise InvalidArgument(f"invalid sandbox id {sandbox_id!r}: expected 4-40 lowercase letters or digits")
    return sandbox_id


def new_sandbox_id() -> str:
    """A fresh random sandbox id (20 lowercase alphanumerics, ~103 bits)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LENGTH))
