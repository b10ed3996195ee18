"""The one table from a domain refusal (`sessions.lifecycle.Refusal`) to an HTTP answer.

The session rules and the writers refuse with a code; which status a client sees depends on the
protocol it speaks: a paused upload is 423 for tus (its clients retry it) but 409 on the seed API,
whose clients resume it themselves; a terminated upload is 410 for tus, 409 for the seed API. A
protocol added later (the IETF draft, whose clients treat any 4xx as final) adds its column here.
The OpenAPI document lists, under each status, the codes this table sends with it.
"""

from __future__ import annotations

from typing import Any

import falcon

from .. import errors
from ..sessions import record as states
from ..sessions.lifecycle import Refusal

SEED, TUS = states.SEED, states.TUS

# code -> status, for every protocol unless OVERRIDES says otherwise
STATUS: dict[str, int] = {
    "not_found": 404,
    "paused": 423,
    "completed": 409,
    "terminated": 410,
    "expired": 410,
    "not_paused": 409,
    "offset_mismatch": 409,
    "exceeds_length": 413,
    "upload_too_large": 413,
    "length_set": 400,
    "bad_header": 400,
    "bad_command": 400,
    "seed_session": 409,
    "final_upload": 403,
    "spool_missing": 409,
    "size_mismatch": 409,
    "tus_upload": 409,
    "checksum_mismatch": 460,
    "digest_mismatch": 460,
    "disk_full": 507,
    "storage_unavailable": 503,
    "writer_unavailable": 503,
    "io_error": 500,
    "internal_error": 500,
}

# (code, protocol) -> status where a protocol's clients need another answer
OVERRIDES: dict[tuple[str, str], int] = {
    ("paused", SEED): 409,
    ("terminated", SEED): 409,
    ("expired", SEED): 409,
}

# Answers a client should retry after a moment.
RETRY_AFTER = {"storage_unavailable": "1", "writer_unavailable": "1"}


def status_of(code: str, protocol: str) -> int:
    return OVERRIDES.get((code, protocol), STATUS.get(code, 400))


def codes_with(status: int, protocol: str) -> list[str]:
    """Every refusal code this table answers with `status` in `protocol` (for the OpenAPI)."""
    return sorted(code for code in STATUS if status_of(code, protocol) == status)


def protocol_of(req: falcon.Request, tus_path: str) -> str:
    """The protocol a request speaks, by its path (the tus collection and its uploads, else the
    seed API)."""
    return TUS if req.path.startswith(tus_path.rstrip("/")) else SEED


def http_error(refusal: Refusal, protocol: str) -> errors.UploadError:
    """The client's answer to a refusal: status from the table, the offset (tus clients go on
    from it) in the body and, for tus, in `Upload-Offset`."""
    extra: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if refusal.offset is not None:
        extra["offset"] = refusal.offset
        if protocol == TUS:
            headers["Upload-Offset"] = str(refusal.offset)
    if refusal.code in RETRY_AFTER:
        headers["Retry-After"] = RETRY_AFTER[refusal.code]
    return errors.UploadError(
        refusal.message,
        code=refusal.code,
        status=status_of(refusal.code, protocol),
        headers=headers,
        **extra,
    )


def install(app: falcon.App, tus_path: str) -> None:
    """Render every `Refusal` a responder lets through, by the request's protocol."""

    def handle(req: falcon.Request, resp: falcon.Response, ex: Refusal, params: Any) -> None:
        errors.render(resp, http_error(ex, protocol_of(req, tus_path)))

    app.add_error_handler(Refusal, handle)
