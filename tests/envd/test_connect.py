"""How HTTP error answers become wrenbox errors (pure function: every shape an agent or proxy sends)."""

from __future__ import annotations

import pytest

from wrenbox.envd.connect import error_for_response
from wrenbox.errors import (
    AlreadyExists,
    GuestError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Timeout,
    WrenboxError,
)


@pytest.mark.parametrize(
    ("status", "body", "kind", "message"),
    [
        # A Connect error: its code wins over the HTTP status.
        (400, b'{"code": "already_exists", "message": "path exists"}', AlreadyExists, "path exists"),
        (404, b'{"code": "not_found", "message": "no process 7"}', NotFound, "no process 7"),
        # envd's /files errors carry the HTTP status as a number.
        (404, b'{"code": 404, "message": "file missing"}', NotFound, "file missing"),
        # Codes that would speak for the API caller (401: "your key is wrong", 503: "retry") are the
        # guest's failure, not the caller's.
        (401, b'{"code": 401, "message": "bad token"}', GuestError, "bad token"),
        (200, b'{"code": "unauthenticated", "message": "x"}', GuestError, "(unauthenticated): x"),
        (503, b'{"code": "unavailable", "message": "busy"}', GuestError, "busy"),
        (500, b'{"code": "internal", "message": "boom"}', GuestError, "boom"),
        # A proxy's plain page: the status decides, the text is the message.
        (403, b"forbidden by proxy", PermissionDenied, "forbidden by proxy"),
        (502, b"<html>bad gateway</html>", GuestError, "bad gateway"),
        (504, b"", Timeout, "HTTP 504"),
        (400, b"", InvalidArgument, "HTTP 400"),
        (418, b"teapot", GuestError, "teapot"),
        # Guest text reaches logs and callers cut short and without terminal escapes.
        (404, b'{"code": "not_found", "message": "\\u001b[2Jgone\\u0007"}', NotFound, "?[2Jgone?"),
    ],
)
def test_error_for_response(status: int, body: bytes, kind: type[WrenboxError], message: str) -> None:
    error = error_for_response(status, body, "GET /files")
    assert type(error) is kind
    assert error.message.startswith("GET /files: ")
    assert message in error.message


def test_a_guest_refusal_keeps_its_code_for_the_host_alone() -> None:
    """The host still learns which refusal it was (a token the agent no longer takes), though no caller
    sees it as its own: the error is a GuestError, 502."""
    for body in (b'{"code": 401, "message": "bad token"}', b'{"code": "unauthenticated", "message": "x"}'):
        error = error_for_response(401, body, "POST /init")
        assert isinstance(error, GuestError)
        assert error.guest_code == "unauthenticated"
        assert error.http_status == 502
    assert error_for_response(502, b"<html>", "GET /x").guest_code == "unavailable"  # type: ignore[attr-defined]
