"""The one error mapping of the HTTP API: every failure is JSON ``{"code": <status>, "message": ...}``.

E2B's SDK parses that body before it looks at anything else, so a bare or HTML error would crash the
caller instead of raising the right exception. Limits answer 429 with ``Retry-After`` (E2B's SDK waits
and retries); a used-up quota answers 429 with ``Should-Retry: false`` (waiting would not help: the SDK
raises at once); other :class:`~wrenbox.errors.WrenboxError` s answer their ``http_status``; anything
unexpected is a logged 500 that names no internals.
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from wrenbox.errors import QuotaExceeded, WrenboxError

__all__ = ["RETRY_AFTER_S", "error_response", "install"]

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status, headers=headers)


def _wrenbox(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, WrenboxError)
    if isinstance(exc, QuotaExceeded):
        return error_response(429, exc.message, {"Should-Retry": "false"})
    if exc.retryable:
        return error_response(429, exc.message, {"Retry-After": str(RETRY_AFTER_S)})
    return error_response(exc.http_status, exc.message)


def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        problems.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg")))
    return error_response(400, "; ".join(problems) or "invalid request")


def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error; the server log has the details")


def install(app: object) -> None:
    """Register the handlers on a FastAPI app."""
    from fastapi import FastAPI

    assert isinstance(app, FastAPI)
    app.add_exception_handler(WrenboxError, _wrenbox)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
