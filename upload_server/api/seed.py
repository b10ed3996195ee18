"""The seed API, exactly as the original README wrote it, plus terminate and several files per POST.

POST   /upload                      multipart/form-data, field `file` (one or more) -> 201
GET    /upload/status?sessionID=    progress and state
GET    /upload/pause?sessionID=     stop the writer at its next chunk boundary
POST   /upload/resume?sessionID=    continue (re-send `file`, or nothing if the spool has it)
POST   /upload/terminate?sessionID= stop, remove partial data and spool
DELETE /upload?sessionID=           the same as terminate
"""

from __future__ import annotations

import re
from typing import Any

import falcon

from .. import errors, seed_follow
from ..protocol import multipart
from ..service import NewUpload, SeedFile, SessionService
from ..sessions import lifecycle
from ..sessions import record as states
from ..sessions.record import Session
from ..status import status_of
from .bodies import open_body

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


class _SeedResource:
    def __init__(self, service: SessionService) -> None:
        self.service = service

    def _session(self, req: falcon.Request) -> Session:
        session = self.service.get(req.get_param("sessionID"), req.context.principal)
        if session.state == states.EXPIRED:
            raise errors.NotFound(
                f"upload session {session.id} expired and was removed", code="session_expired"
            )
        return _shown(session)

    def _answer(self, resp: falcon.Response, session: Session) -> None:
        resp.media = status_of(session)

    def _terminate(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Terminate; a repeat answers the terminated session again (the seed API's idempotence)."""
        session = self._session(req)
        if session.state != states.TERMINATED:
            lifecycle.check_command(session, lifecycle.TERMINATE)
            session = self.service.control(session, lifecycle.TERMINATE)
        self._answer(resp, session)


class UploadResource(_SeedResource):
    """POST /upload creates sessions; DELETE /upload terminates one."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        config = self.service.config
        with open_body(req, self.service, limit=config.max_upload_size + 1024**2) as body:
            parts = _parse_form(req, body, seed_follow.part_ends(body, self.service.pool))
            files = [p for p in parts if p.name == "file"]
            if not files:
                raise errors.BadRequest(
                    "the form has no 'file' field: send the file as multipart/form-data field "
                    "'file'",
                    code="missing_file",
                )
            digests = _declared_digests(body, parts, len(files))
            for part in files:
                if part.size > config.max_upload_size:
                    raise errors.TooLarge(
                        f"{part.filename or 'the file'} is {part.size} bytes; the limit is "
                        f"{config.max_upload_size}",
                        code="upload_too_large",
                    )
            sessions = self.service.create_seeds(
                [
                    SeedFile(
                        NewUpload(
                            protocol=states.SEED,
                            filename=part.filename,
                            total_bytes=part.size,
                            filetype=part.content_type,
                            expected_sha256=digest,
                            principal=req.context.principal,
                            client=req.context.client,
                        ),
                        part.start,
                        part.end,
                    )
                    for part, digest in zip(files, digests, strict=True)
                ],
                body,
            )
        resp.status = falcon.HTTP_201
        resp.media = {
            "sessionID": sessions[0].id,
            "sessionIDs": [s.id for s in sessions],
            "files": [
                {"sessionID": s.id, "filename": s.filename, "totalBytes": s.total_bytes}
                for s in sessions
            ],
        }

    def on_delete(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._terminate(req, resp)


class StatusResource(_SeedResource):
    """One session's status, or a batch: `?sessionID=a&sessionID=b` or `?sessionIDs=a,b`."""

    MAX_BATCH = 1000

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ids = req.get_param_as_list("sessionID") or []
        ids += [i for i in (req.get_param("sessionIDs") or "").split(",") if i]
        if len(ids) <= 1 and not req.get_param("sessionIDs"):
            self._answer(resp, self._session(req))
            return
        if len(ids) > self.MAX_BATCH:
            raise errors.BadRequest(f"at most {self.MAX_BATCH} ids at once", code="batch_too_large")
        found, missing = [], []
        for session_id in dict.fromkeys(ids):
            try:
                found.append(status_of(_shown(self.service.get(session_id, req.context.principal))))
            except errors.NotFound:
                missing.append(session_id)
        resp.media = {"sessions": found, "notFound": missing}


class PauseResource(_SeedResource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        session = self._session(req)
        lifecycle.check_command(session, lifecycle.PAUSE)
        self._answer(resp, self.service.control(session, lifecycle.PAUSE))

    on_post = on_get


class ResumeResource(_SeedResource):
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        session = self._session(req)
        lifecycle.check_command(session, lifecycle.RESUME)
        if not req.content_length and not req.content_type:
            self._answer(resp, self.service.resume(session, None, None))
            return
        with open_body(
            req, self.service, limit=self.service.config.max_upload_size + 1024**2
        ) as body:
            files = [p for p in _parse_form(req, body) if p.name == "file"]
            if len(files) != 1:
                raise errors.BadRequest(
                    "resume takes the file again as one 'file' field, or no body at all",
                    code="too_many_files" if files else "missing_file",
                )
            self._answer(resp, self.service.resume(session, body, files[0]))


class TerminateResource(_SeedResource):
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._terminate(req, resp)


def _shown(session: Session) -> Session:
    """A session past `--keep-finished` keeps only a tombstone: its status is gone, and the
    answer says how it ended rather than that the id is unknown."""
    if lifecycle.is_tombstone(session):
        raise errors.NotFound(
            f"upload session {session.id} ended ({session.state}) and its record was removed "
            "after the retention time",
            code="session_ended",
        )
    return session


def _parse_form(
    req: falcon.Request, body: Any, ends: dict[int, int] | None = None
) -> list[multipart.Part]:
    try:
        boundary = multipart.boundary_of(req.content_type)
    except multipart.MultipartError as exc:
        if req.content_type and req.content_type.lower().startswith("multipart/form-data"):
            raise errors.BadRequest(str(exc), code="bad_multipart") from None
        raise errors.UnsupportedMediaType(str(exc), code="not_multipart") from None
    try:
        return multipart.parse(body, boundary, ends)
    except multipart.MultipartError as exc:
        raise errors.BadRequest(str(exc), code="bad_multipart") from None


def _declared_digests(body: Any, parts: list[multipart.Part], count: int) -> list[str | None]:
    """`sha256` form fields, one per file in order (a single one may be given for one file)."""
    values = []
    for part in parts:
        if part.name != "sha256":
            continue
        if part.size > 200:
            raise errors.BadRequest("the sha256 field is too long", code="bad_digest")
        value = body.read(part.start, part.end).decode("latin-1").strip()
        if not _SHA256.match(value):
            raise errors.BadRequest("sha256 must be 64 hexadecimal digits", code="bad_digest")
        values.append(value.lower())
    if not values:
        return [None] * count
    if len(values) != count:
        raise errors.BadRequest(
            f"{len(values)} sha256 fields for {count} files: send one per file, in order",
            code="bad_digest",
        )
    return values
