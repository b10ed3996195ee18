"""Three adjustments to waitress, applied process-wide by `create_app` (so `waitress-serve` gets them).

1. JSON errors: waitress answers some requests itself (body too large, malformed HTTP, headers too
   large) before the app sees them; those answers get the app's `{"error": ...}` shape.
2. Keep-alive after 204: waitress 3.0 closes the connection after every response without a
   Content-Length, including 204 and 304, which by definition have no body (RFC 9112 section 6.3)
   and must not carry one. Every tus PATCH answers 204, so each would cost the client a new TCP (and
   TLS) connection. The task below keeps such connections open unless the client asked to close.
3. Request bodies past 512 KiB spill to temporary files in the spool directory, created so that they
   can be linked: a tus PATCH body then becomes its spool segment by a link, with no copy at all.
"""

from __future__ import annotations

from pathlib import Path

import waitress.buffers
import waitress.channel
import waitress.task
import waitress.utilities

from . import fileio
from .errors import error_body


def _json_response(self: waitress.utilities.Error, ident: str | None = None):
    code = self.reason.lower().replace(" ", "_")
    body = error_body(code, f"{self.reason}: {self.body}")
    return f"{self.code} {self.reason}", [("Content-Type", "application/json")], body


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


def install(spool_dir: Path) -> None:
    waitress.utilities.Error.to_response = _json_response
    waitress.channel.HTTPChannel.task_class = KeepAliveTask
    waitress.buffers.TempfileBasedBuffer.newfile = lambda self: fileio.linkable_tempfile(spool_dir)
