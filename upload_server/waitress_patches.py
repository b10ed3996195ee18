"""Four adjustments to waitress, applied process-wide by `create_app` (so `waitress-serve` gets them).

1. JSON errors: waitress answers some requests itself (body too large, malformed HTTP, headers too
   large) before the app sees them; those answers get the app's `{"error": ...}` shape, plus the
   `Tus-Resumable` a tus client expects and the CORS header a browser needs to read them.
2. Keep-alive after 204: waitress 3.0 closes the connection after every response without a
   Content-Length, including 204 and 304, which by definition have no body (RFC 9112 section 6.3)
   and must not carry one. Every tus PATCH answers 204, so each would cost the client a new TCP (and
   TLS) connection. The task below keeps such connections open unless the client asked to close.
3. Request bodies past 512 KiB spill to temporary files in the spool directory, created so that they
   can be linked: a tus PATCH body then becomes its spool segment by a link, with no copy at all.
4. A body that would eat into the free-space reserve is refused with 507 as soon as its headers
   arrive, before waitress reads (and spills to disk) a byte of it; no refusal, this one or a 413,
   is preceded by a `100 Continue` that would invite the body.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import waitress.buffers
import waitress.channel
import waitress.parser
import waitress.task
import waitress.utilities

from . import fileio
from .errors import error_body
from .protocol import tus


def _json_response(self: waitress.utilities.Error, ident: str | None = None):
    code = self.reason.lower().replace(" ", "_")
    body = error_body(code, f"{self.reason}: {self.body}")
    return f"{self.code} {self.reason}", [("Content-Type", "application/json")], body


class InsufficientStorage(waitress.utilities.Error):
    code = 507
    reason = "Insufficient Storage"


class AdmittingParser(waitress.parser.HTTPRequestParser):
    """Asks `admit` about a declared Content-Length once the headers are parsed. (A chunked body
    declares none; the app checks it once it has arrived.)"""

    admit: Callable[[int], str | None] = staticmethod(lambda length: None)

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        if self.content_length > 0:
            refusal = self.admit(self.content_length)
            if refusal:
                self.error = InsufficientStorage(refusal)
                self.completed = True

    def received(self, data: bytes) -> int:
        consumed = super().received(data)
        if self.error is not None:
            self.expect_continue = False  # refused (507, 413, ...): the client must not send on
        return consumed


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


def install(
    spool_dir: Path,
    allow_origin: Callable[[str], str | None],
    admit: Callable[[int], str | None],
) -> None:
    """`allow_origin` maps a request's Origin to its Access-Control-Allow-Origin (None: none);
    `admit` says why a body of that many bytes cannot be stored (None: it can)."""
    waitress.utilities.Error.to_response = _json_response
    AdmittingParser.admit = staticmethod(admit)
    waitress.channel.HTTPChannel.parser_class = AdmittingParser
    JsonErrorTask.allow_origin = staticmethod(allow_origin)
    waitress.channel.HTTPChannel.error_task_class = JsonErrorTask
    waitress.channel.HTTPChannel.task_class = KeepAliveTask
    waitress.buffers.TempfileBasedBuffer.newfile = lambda self: fileio.linkable_tempfile(spool_dir)
