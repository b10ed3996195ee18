"""The one place where errors become `{"error": {"code": ..., "message": ...}}` responses.

Domain code raises `UploadError` (or a subclass) with a stable machine-readable `code`; the Falcon
handlers registered by `install` render it, Falcon's own HTTP errors and any unexpected exception in
the same JSON shape, so a client never sees a traceback.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import falcon

log = logging.getLogger("upload_server")


class UploadError(Exception):
    """An error a client can act on. `extra` fields are added to the JSON error object."""

    status = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> bytes:
        """The response body: the JSON error object (a hook's answer may shape its own)."""
        return error_body(self.code, self.message, **self.extra)


class BadRequest(UploadError):
    status, code = 400, "bad_request"


class NotFound(UploadError):
    status, code = 404, "not_found"


class Conflict(UploadError):
    status, code = 409, "conflict"


class Gone(UploadError):
    status, code = 410, "gone"


class TooLarge(UploadError):
    status, code = 413, "too_large"


class UnsupportedMediaType(UploadError):
    status, code = 415, "unsupported_media_type"


class Locked(UploadError):
    status, code = 423, "locked"


class InsufficientStorage(UploadError):
    status, code = 507, "insufficient_storage"


class Unavailable(UploadError):
    status, code = 503, "unavailable"


def error_body(code: str, message: str, **extra: Any) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, **extra}}).encode()


_REASONS = {460: "Checksum Mismatch"}  # tus's own status code


def _status_line(status: int) -> str:
    if status in _REASONS:
        return f"{status} {_REASONS[status]}"
    return falcon.code_to_http_status(status)


def _handle_upload_error(
    req: falcon.Request, resp: falcon.Response, ex: UploadError, params
) -> None:
    render(resp, ex)


def render(resp: falcon.Response, ex: UploadError) -> None:
    """Write `ex` as the response: its status, the JSON error object and its headers."""
    resp.status = _status_line(ex.status)
    resp.content_type = falcon.MEDIA_JSON
    resp.data = ex.body()
    for name, value in ex.headers.items():
        resp.set_header(name, value)


def handle_http_error(
    req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params
) -> None:
    code = (ex.title or "error").lower().replace(" ", "_").replace("-", "_")
    message = ex.description or ex.title or "error"
    resp.status = ex.status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = error_body(code, message)
    for name, value in (ex.headers or {}).items():
        resp.set_header(name, value)


def _handle_unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params) -> None:
    if isinstance(ex, falcon.HTTPError | falcon.HTTPStatus):
        raise ex
    log.exception("unhandled error in %s %s", req.method, req.path)
    resp.status = falcon.HTTP_500
    resp.content_type = falcon.MEDIA_JSON
    resp.data = error_body(
        "internal_error", "the server failed to handle this request; see its log"
    )


def install(app: falcon.App) -> None:
    """Register the JSON error handlers on a Falcon app."""
    app.add_error_handler(Exception, _handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(UploadError, _handle_upload_error)
