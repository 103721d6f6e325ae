"""What the app does to raw HTTP requests before and around its routes, so that no request can make it answer
anything but OpenAI's JSON error shape with a 4xx (5xx only for its own faults).

In order: a browser's cross-site request (403 unless its origin is allowed), the API key (one
``Authorization: Bearer KEY`` header on every route but ``/health``; the chat page at ``/`` also takes HTTP Basic auth
with the key as password, so a browser can open it), shutdown (503 while draining), the declared body size (413; a
bad ``Content-Length`` is a 400), then, while a route reads it, the body's actual size (``read_body``: 413 however it
is sent). ``install_error_handlers`` answers everything that goes wrong in a route in the same shape.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import APIError

logger = logging.getLogger("hf_paged.serve")


class Guard:
    """ASGI middleware: API key, shutdown, declared body size. Streams pass through untouched (no buffering,
    disconnects seen at once)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, draining: Callable[[], bool],
                 allowed_origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.draining = draining
        self.allowed_origins = allowed_origins

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            error, headers = self._refusal(scope)
            if error is not None:
                await _send_error(send, error, headers)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope) -> tuple[APIError | None, dict[str, str] | None]:
        path = scope.get("path", "")
        raw = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", [])]
        headers = dict(raw)
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, headers.get("host", "")):
            return APIError(403, f"cross-origin requests from {origin!r} are refused (hf-paged serve "
                                 "--allowed-origins lets origins in)", code="forbidden_origin"), None
        if sum(k == "authorization" for k, _ in raw) > 1:
            return APIError(401, "more than one Authorization header", code="invalid_api_key"), None
        if self.api_key and path != "/health" and not _authorized(headers.get("authorization", ""), self.api_key):
            challenge = 'Basic realm="hf-paged", charset="UTF-8"' if path == "/" else "Bearer"
            return (APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key"),
                    {"www-authenticate": challenge})
        if self.draining() and path not in ("/health", "/metrics"):
            return APIError(503, "the server is shutting down", code="shutting_down"), None
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return APIError(400, "bad Content-Length header", code="invalid_request"), None
        if length is not None and int(length) > self.max_body_bytes:
            return _too_large(self.max_body_bytes), {"connection": "close"}
        return None, None

    def _origin_allowed(self, origin: str, host: str) -> bool:
        """A browser's page may call the server from the server's own pages, or from an origin it was told to
        trust: any other site's page could otherwise drive a server on localhost (a simple POST needs no CORS
        preflight)."""
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return True
        scheme, _, rest = origin.partition("://")
        return scheme in ("http", "https") and bool(host) and rest == host


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, counted as it arrives (a chunked body declares no size): 413 past ``max_bytes``."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure in a route answered in OpenAI's error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", type_="server_error").body(),
                            status_code=500)


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the body is larger than {max_bytes} bytes", code="body_too_large")


def _authorized(header: str, api_key: str) -> bool:
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return hmac.compare_digest(value.strip().encode(), api_key.encode())
    if scheme == "basic":  # browsers: any user name, the key as password
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), api_key.encode())
    return False


async def _send_error(send, error: APIError, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
