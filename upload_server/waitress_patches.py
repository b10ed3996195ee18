"""Three adjustments to waitress, applied process-wide by `create_app` (so `waitress-serve` gets them).

1. JSON errors: waitress answers some requests itself (body too large, malformed HTTP, headers too
   large) before the app sees them; those answers get the app's `{"error": ...}` shape, plus the
   `Tus-Resumable` a tus client expects and the CORS header a browser needs to read them.
2. Keep-alive after 204: waitress 3.0 closes the connection after every response without a
   Content-Length, including 204 and 304, which by definition have no body (RFC 9112 section 6.3)
   and must not carry one. Every tus PATCH answers 204, so each would cost the client a new TCP (and
   TLS) connection. The task below keeps such connections open unless the client asked to close.
3. Request bodies past 512 KiB spill to temporary files in the spool directory, created so that they
   can be linked: a tus PATCH body then becomes its spool segment by a link, with no copy at all.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import waitress.buffers
import waitress.channel
import waitress.task
import waitress.utilities

from . import fileio
from .errors import error_body
from .protocol import tus


def _json_response(self: waitress.utilities.Error, ident: str | None = None):
    code = self.reason.lower().replace(" ", "_")
    body = error_body(code, f"{self.reason}: {self.body}")
    return f"{self.code} {self.reason}", [("Content-Type", "application/json")], body


class JsonErrorTask(waitress.task.ErrorTask):
    """waitress's own error answer, with the headers the app would have added."""

    allow_origin: Callable[[str], str | None] = staticmethod(lambda origin: None)

    def execute(self) -> None:
        headers = self.request.headers
        if "TUS_RESUMABLE" in headers:
            self.response_headers.append(("Tus-Resumable", tus.VERSION))
        allowed = self.allow_origin(headers.get("ORIGIN", ""))
        if allowed:
            self.response_headers.append(("Access-Control-Allow-Origin", allowed))
        super().execute()


class KeepAliveTask(waitress.task.WSGITask):
    """A WSGI task that does not close an HTTP/1.1 connection because a response has no body."""

    _bodiless_keep_alive = False

    def build_response_header(self) -> bytes:
        wants_close = self.request.headers.get("CONNECTION", "").lower() == "close"
        self._bodiless_keep_alive = self.version == "1.1" and not wants_close and not self.has_body
        try:
            return super().build_response_header()
        finally:
            self._bodiless_keep_alive = False

    def set_close_on_finish(self) -> None:
        if not self._bodiless_keep_alive:
            super().set_close_on_finish()


def install(spool_dir: Path, allow_origin: Callable[[str], str | None]) -> None:
    """`allow_origin` maps a request's Origin to its Access-Control-Allow-Origin (None: none)."""
    waitress.utilities.Error.to_response = _json_response
    JsonErrorTask.allow_origin = staticmethod(allow_origin)
    waitress.channel.HTTPChannel.error_task_class = JsonErrorTask
    waitress.channel.HTTPChannel.task_class = KeepAliveTask
    waitress.buffers.TempfileBasedBuffer.newfile = lambda self: fileio.linkable_tempfile(spool_dir)
