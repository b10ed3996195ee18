"""The one table from a domain refusal (`sessions.lifecycle.Refusal`) to an HTTP answer.

The session rules and the writers refuse with a code; which status a client sees depends on the
protocol it speaks: a paused upload is 423 for tus (its clients retry it) but 409 on the seed API,
whose clients resume it themselves; a terminated upload is 410 for tus, 409 for the seed API. The
IETF draft's clients treat any 4xx as final, so what may pass (a pause, a lock) is a 503 with
`Retry-After` for them, and every error they get is an RFC 9457 problem (`application/problem+json`)
with the problem type their interop version defines. The OpenAPI document lists, under each status,
the codes this table sends with it.
"""

from __future__ import annotations

import json
from typing import Any

import falcon

from .. import errors
from ..protocol import draft
from ..sessions import record as states
from ..sessions.lifecycle import Refusal

SEED, TUS, IETF = states.SEED, states.TUS, states.IETF

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
    "state_lost": 410,
}

# (code, protocol) -> status where a protocol's clients need another answer
OVERRIDES: dict[tuple[str, str], int] = {
    ("paused", SEED): 409,
    ("terminated", SEED): 409,
    ("expired", SEED): 409,
    # the draft: a 4xx is final for its clients, so what passes is a 503 they retry
    ("paused", IETF): 503,
    ("upload_locked", IETF): 503,
    ("terminated", IETF): 404,
    ("expired", IETF): 404,
    ("completed", IETF): 400,
    ("exceeds_length", IETF): 400,
    ("length_set", IETF): 400,
    ("inconsistent_length", IETF): 400,
    ("upload_too_large", IETF): 413,
    ("checksum_mismatch", IETF): 400,  # Content-Digest (tus's own 460 means nothing to them)
    ("digest_mismatch", IETF): 400,
}

# Answers a client should retry after a moment.
RETRY_AFTER = {"storage_unavailable": "1", "writer_unavailable": "1"}
RETRY_AFTER_DRAFT = {"paused": "5", "upload_locked": "1"}

# The draft's problem types, by refusal code (used where the client's interop version defines it).
PROBLEM_TYPES = {
    "offset_mismatch": draft.MISMATCHING_OFFSET,
    "inconsistent_length": draft.INCONSISTENT_LENGTH,
    "exceeds_length": draft.INCONSISTENT_LENGTH,
    "length_set": draft.INCONSISTENT_LENGTH,
    "completed": draft.COMPLETED_UPLOAD,
}


def status_of(code: str, protocol: str, default: int = 400) -> int:
    return OVERRIDES.get((code, protocol), STATUS.get(code, default))


def codes_with(status: int, protocol: str) -> list[str]:
    """Every refusal code this table answers with `status` in `protocol` (for the OpenAPI)."""
    return sorted(code for code in STATUS if status_of(code, protocol) == status)


def protocol_of(req: falcon.Request, tus_path: str) -> str:
    """The protocol a request speaks: by its path (the tus collection and its uploads, else the
    seed API), and there by its headers (the IETF draft's, else tus)."""
    if not req.path.startswith(tus_path.rstrip("/")):
        return SEED
    return IETF if draft.speaks_draft(req.get_header) else TUS


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


def render_problem(req: falcon.Request, resp: falcon.Response, ex: errors.UploadError) -> None:
    """An error as the draft's clients get it: an RFC 9457 problem, its status from the draft's
    column, the problem type if the client's interop version defines one (else `about:blank`),
    `code` as an extension member, and `Upload-Complete: ?0` (the answer is about the upload,
    not the processed representation)."""
    try:
        dialect = draft.dialect(req.get_header(draft.VERSION_HEADER))
    except draft.DraftHeaderError:
        dialect = draft.DIALECTS[draft.CURRENT]
    status = status_of(ex.code, IETF, ex.status)
    problem: dict[str, Any] = {
        "type": dialect.problem_type(PROBLEM_TYPES.get(ex.code, "about:blank")),
        "title": falcon.code_to_http_status(status).split(" ", 1)[1],
        "status": status,
        "detail": ex.message,
        "code": ex.code,
    }
    offset = ex.extra.get("offset")
    if offset is not None:
        resp.set_header("Upload-Offset", str(offset))
        if ex.code == "offset_mismatch":
            problem["expected-offset"] = offset
            provided = req.context.get("draft_offset")
            if provided is not None:
                problem["provided-offset"] = provided
    for name, value in ex.headers.items():
        if name.lower() not in ("tus-version",):
            resp.set_header(name, value)
    if ex.code in RETRY_AFTER_DRAFT:
        resp.set_header("Retry-After", RETRY_AFTER_DRAFT[ex.code])
    limit = req.context.get("draft_limit")
    if limit and status == 413:
        resp.set_header("Upload-Limit", limit)
    resp.set_header(*dialect.completeness(False))
    resp.status = falcon.code_to_http_status(status)
    resp.content_type = draft.PROBLEM_JSON
    resp.data = json.dumps(problem).encode()


def install(app: falcon.App, tus_path: str) -> None:
    """Render every `Refusal` and `UploadError` a responder lets through, by the request's
    protocol (the draft's clients get problem details, the others `{"error": ...}`)."""

    def handle(req: falcon.Request, resp: falcon.Response, ex: Refusal, params: Any) -> None:
        protocol = protocol_of(req, tus_path)
        answer = http_error(ex, protocol)
        if protocol == IETF:
            render_problem(req, resp, answer)
        else:
            errors.render(resp, answer)

    def handle_error(
        req: falcon.Request, resp: falcon.Response, ex: errors.UploadError, params: Any
    ) -> None:
        if protocol_of(req, tus_path) == IETF:
            render_problem(req, resp, ex)
        else:
            errors.render(resp, ex)

    def handle_http_error(
        req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: Any
    ) -> None:
        if protocol_of(req, tus_path) != IETF:
            errors.handle_http_error(req, resp, ex, params)
            return
        code = (ex.title or "error").lower().replace(" ", "_")
        answer = errors.UploadError(
            ex.description or ex.title or "error",
            code=code,
            status=ex.status_code,
            headers=dict(ex.headers or {}),
        )
        render_problem(req, resp, answer)

    app.add_error_handler(Refusal, handle)
    app.add_error_handler(errors.UploadError, handle_error)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
