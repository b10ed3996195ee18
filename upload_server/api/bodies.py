"""Opening a request's body for the resources, with the size limit turned into a 413."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import falcon

from .. import errors
from ..received_body import BodyTooLarge, RequestBody
from ..service import SessionService


@contextlib.contextmanager
def open_body(req: falcon.Request, service: SessionService, *, limit: int) -> Iterator[RequestBody]:
    try:
        body = RequestBody(req.stream, req.content_length, service.layout.spool_dir, limit)
    except BodyTooLarge:
        raise errors.TooLarge(
            f"the request body is larger than this server accepts ({limit} bytes)",
            code="body_too_large",
        ) from None
    try:
        yield body
    finally:
        body.close()


def empty_body(service: SessionService) -> RequestBody:
    """No content: an append that only completes an upload."""
    return RequestBody(io.BytesIO(b""), 0, service.layout.spool_dir, 0)
