"""Access control: the envd access token, signed file URLs, and the acting user of a request.

Once ``/init`` has set an access token, every request must carry it in ``X-Access-Token`` (compared in
constant time), except ``GET /health``, which reveals nothing, and ``/files`` requests that carry a
valid URL signature instead (the e2b SDK's ``download_url``/``upload_url``): ``v1_`` + unpadded
base64 of SHA-256 over ``path:operation:username:token[:expiration]``.

As in envd, a signature without ``signature_expiration`` never expires and no expiration is too far
away: E2B's SDK only adds one when asked, so refusing either would break it. wrenbox's own client
(:meth:`wrenbox.client.ServerClient.file_url`) always sets one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

from wrenbox.errors import Unauthenticated

__all__ = ["TOKEN_HEADER", "basic_auth_username", "check_token", "file_signature", "verify_file_signature"]

TOKEN_HEADER = "x-access-token"


def check_token(expected: str | None, headers: Mapping[str, str]) -> bool:
    """True if no token is set or the request carries the right one."""
    if expected is None:
        return True
    given = headers.get(TOKEN_HEADER)
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def file_signature(path: str, operation: str, username: str, token: str, expiration: int | None) -> str:
    fields = [path, operation, username, token]
    if expiration is not None:
        fields.append(str(expiration))
    digest = hashlib.sha256(":".join(fields).encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode("ascii")


def verify_file_signature(token: str, query: Mapping[str, str], operation: str) -> None:
    """Accept a signed /files URL; Unauthenticated with the reason otherwise."""
    signature = query.get("signature")
    if signature is None:
        raise Unauthenticated("missing access token or URL signature")
    raw_expiration = query.get("signature_expiration")
    expiration = None
    if raw_expiration is not None:
        try:
            expiration = int(raw_expiration)
        except ValueError:
            raise Unauthenticated("invalid signature_expiration") from None
    expected = file_signature(query.get("path", ""), operation, query.get("username", ""), token, expiration)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise Unauthenticated("invalid URL signature")
    if expiration is not None and expiration < time.time():
        raise Unauthenticated("signature is already expired")  # envd's words; E2B's tests match them


def basic_auth_username(headers: Mapping[str, str]) -> str | None:
    """The username of an ``Authorization: Basic`` header (how Connect calls pick a user), or None."""
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic":
        raise Unauthenticated("only Basic authorization is understood (it names the user)")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthenticated("malformed Basic authorization header") from None
    return decoded.partition(":")[0] or None
