"""waitress answers some requests itself (body too large, malformed HTTP, headers too large) before
the app sees them. This gives those answers the same JSON error shape as the app's own."""

from __future__ import annotations

import waitress.utilities

from .errors import error_body


def _json_response(self: waitress.utilities.Error, ident: str | None = None):
    code = self.reason.lower().replace(" ", "_")
    body = error_body(code, f"{self.reason}: {self.body}")
    return f"{self.code} {self.reason}", [("Content-Type", "application/json")], body


def install() -> None:
    waitress.utilities.Error.to_response = _json_response
