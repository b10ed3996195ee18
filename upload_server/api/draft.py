"""Resumable Uploads for HTTP (the IETF draft) on the tus collection and its uploads.

    OPTIONS       /files/        Upload-Limit (with tus's capabilities: the route is shared)
    POST|PUT|PATCH /files/       creation (with or without content, `Upload-Complete: ?0`/`?1`)
    HEAD|GET      /files/{id}    offset retrieval
    PATCH         /files/{id}    append (`application/partial-upload` from interop 6)
    DELETE        /files/{id}    cancellation

A request speaks the draft when it says so by its headers (`protocol.draft.speaks_draft`); the
routes (`CollectionRoute`, `UploadRoute`) hand it here, any other to tus. The sessions are the
same as tus's and the seed API's, with `protocol = "ietf"`: the same service, writers, limits,
hooks and status. Completion is explicit: only a request with `Upload-Complete: ?1` declares the
upload's length to the writer, which then completes it as any upload (`lifecycle.draft_length`).

The `104 (Upload Resumption Supported)` with `Location` is sent by the waitress adjustments
(`interim.py`) once the headers are in, before the body: they run this resource's creation with
no content on a worker thread (`RESERVE` in the environ: the real content length), send the 104
from its answer, and the complete request (or the prefix of a cut one) then arrives with the
upload already created (`CREATED`), to append its content to.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import falcon

from .. import errors
from ..config import Config
from ..cut_bodies import ENVIRON_KEY as CUT
from ..cut_bodies import CutBodies
from ..interim import CREATED, RESERVE
from ..locks import Locks
from ..protocol import draft, tus
from ..service import NewUpload, SessionService
from ..sessions import lifecycle
from ..sessions import record as states
from ..sessions.record import Session
from ..status import status_of
from .bodies import open_body
from .tus import repr_digest

LOCK_WAIT = 10.0  # a draft client takes a 4xx as final: wait out a request in flight, then 503
_REPR_TYPES = frozenset({"application/octet-stream", draft.PARTIAL_UPLOAD})


def _problem(message: str, code: str, status: int = 400, **extra: Any) -> errors.UploadError:
    return errors.UploadError(message, code=code, status=status, **extra)


def limit_of(
    config: Config, dialect: draft.Dialect | None = None, session: Session | None = None
) -> str | None:
    """`Upload-Limit` from the server's real limits: the size limit (one request may carry all of
    it), and the lifetime left (of `session`, else of a new upload); `dialect` defaults to the
    current version."""
    if session is not None:
        expires = session.expires_at
        age = None if expires is None else int(expires - time.time())
    else:
        age = int(config.expiry) if config.expiry else None
    size = config.max_upload_size
    dialect = dialect or draft.DIALECTS[draft.CURRENT]
    return draft.upload_limit(dialect, max_size=size, max_append=size, max_age=age)


class DraftResources:
    """The draft's responders over `SessionService`, called by the shared routes."""

    def __init__(self, service: SessionService, locks: Locks, cut_bodies: CutBodies) -> None:
        self.service = service
        self.locks = locks
        self.cut_bodies = cut_bodies
        self.base_path = service.config.tus_path

    # -- helpers ----------------------------------------------------------------------------

    def _dialect(self, req: falcon.Request) -> draft.Dialect:
        """The request's interop version (refused when missing or unknown); its `Upload-Limit`
        is kept for a 413 answer ('SHOULD include the Upload-Limit header field')."""
        try:
            dialect = draft.dialect(req.get_header(draft.VERSION_HEADER))
        except draft.DraftHeaderError as exc:
            raise _problem(str(exc), exc.code) from None
        req.context.draft_limit = self.limit(dialect)
        return dialect

    def limit(self, dialect: draft.Dialect, session: Session | None = None) -> str | None:
        return limit_of(self.service.config, dialect, session)

    def _location(self, req: falcon.Request, session_id: str) -> str:
        return f"{req.prefix}{self.base_path}{session_id}"

    def _session(self, req: falcon.Request, upload_id: str) -> Session:
        session = self.service.get(upload_id, req.context.principal)
        if session.state in lifecycle.ENDED:
            raise lifecycle.Refusal(session.state, f"upload {upload_id} was {session.state}")
        if lifecycle.is_deactivated(session):
            raise lifecycle.Refusal(lifecycle.STATE_LOST, f"the server lost part of {upload_id}")
        return session

    @staticmethod
    def _parse(req: falcon.Request, dialect: draft.Dialect) -> tuple[bool | None, int | None]:
        """(does it complete the upload, the length it announces)."""
        try:
            complete = draft.parse_complete(dialect, req.get_header)
            announced = draft.parse_integer("Upload-Length", req.get_header("Upload-Length"))
        except draft.DraftHeaderError as exc:
            raise _problem(str(exc), exc.code) from None
        if req.env.get(CUT):
            complete = False  # only a prefix arrived: the upload must not be complete then
        return complete, announced

    def _answer(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        dialect: draft.Dialect,
        session: Session,
        status: str,
    ) -> None:
        """The headers every answer about an upload carries; a completed upload's answer is what
        the collection answers for a whole upload (its status), with `Upload-Complete: ?1`."""
        complete = session.state == states.COMPLETED
        resp.status = status
        resp.set_header(*dialect.completeness(complete))
        resp.set_header("Upload-Offset", str(session.bytes_written))
        limit = self.limit(dialect, session)
        if limit and not complete:
            resp.set_header("Upload-Limit", limit)
        if complete:
            if session.sha256:
                resp.set_header("Repr-Digest", repr_digest(session.sha256))
            resp.content_type = falcon.MEDIA_JSON
            resp.data = json.dumps(status_of(session)).encode()

    def _check_size(self, total: int | None) -> None:
        limit = self.service.config.max_upload_size
        if total is not None and total > limit:
            raise _problem(
                f"the upload of {total} bytes is larger than max-size {limit}",
                "upload_too_large",
                413,
            )

    # -- the collection ----------------------------------------------------------------------

    def options(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Upload-Limit on every OPTIONS of the collection (min-size=0 when nothing else)."""
        version = req.get_header(draft.VERSION_HEADER)
        dialect = draft.DIALECTS.get(int(version) if (version or "").isdigit() else 0)
        limit = self.limit(dialect or draft.DIALECTS[draft.CURRENT])
        if limit:
            resp.set_header("Upload-Limit", limit)

    def create(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Creation: a new upload (or the one the 104 announced), then its content if any."""
        dialect = self._dialect(req)
        complete, announced = self._parse(req, dialect)
        if complete is None:
            raise _problem(f"upload creation needs {dialect.complete_header}", "bad_header")
        reserve = req.env.get(RESERVE)  # at headers time: the Content-Length (-1: chunked)
        length = (req.content_length or 0) if reserve is None else max(reserve, 0)
        total = length if complete and (reserve is None or reserve >= 0) else None
        if announced is not None and total is not None and announced != total:
            raise _problem(
                f"Upload-Length {announced} differs from the {total} bytes that complete it",
                "inconsistent_length",
            )
        if announced is not None and length > announced:
            raise _problem(
                f"the content of {length} bytes is longer than Upload-Length {announced}",
                "inconsistent_length",
            )
        self._check_size(announced if announced is not None else total)
        created = req.env.get(CREATED)
        if created:
            session = self.service.get(created, req.context.principal)
        else:
            if req.env.get(CUT):
                raise _problem("a cut creation whose client never learnt its upload", "cut")
            session = self.service.create(self._new(req, announced))
        if reserve is None:
            req.context.draft_offset = 0
            try:
                session = self._append(req, dialect, session, 0, complete, announced)
            except Exception:
                if not created:  # the client learns no Location: leave no orphan
                    with contextlib.suppress(errors.UploadError, lifecycle.Refusal):
                        self.service.control(session, lifecycle.TERMINATE, completed_too=True)
                raise
        resp.set_header("Location", self._location(req, session.id))
        self._answer(req, resp, dialect, session, falcon.HTTP_201)

    def _new(self, req: falcon.Request, announced: int | None) -> NewUpload:
        """What the request says of the representation: its media type, its filename (the
        `Content-Disposition`, else a tus-style `Upload-Metadata` some clients also send)."""
        config = self.service.config
        try:
            header = req.get_header("Upload-Metadata")
            metadata = tus.parse_metadata(header, config.max_metadata_size)
        except tus.TusHeaderError as exc:
            raise _problem(str(exc), "bad_header") from None
        media = (req.content_type or "").split(";")[0].strip().lower()
        filetype = None if not media or media in _REPR_TYPES else media
        filename = draft.disposition_filename(req.get_header("Content-Disposition"))
        return NewUpload(
            protocol=states.IETF,
            filename=filename or metadata.get("filename") or metadata.get("name"),
            total_bytes=None,
            filetype=filetype or metadata.get("filetype") or metadata.get("type"),
            metadata=metadata,
            metadata_header=header,
            expected_sha256=self._declared_sha256(req),
            principal=req.context.principal,
            client=req.context.client,
            announced_length=announced,
        )

    @staticmethod
    def _declared_sha256(req: falcon.Request) -> str | None:
        """The representation's SHA-256 a client declares at creation (`Repr-Digest`), which the
        writer checks at completion (a mismatch fails the upload)."""
        try:
            digests = draft.parse_digests("Repr-Digest", req.get_header("Repr-Digest"))
        except draft.DraftHeaderError as exc:
            raise _problem(str(exc), "bad_digest") from None
        value = digests.get("sha-256")
        if value is not None and len(value) != 32:
            raise _problem("the Repr-Digest sha-256 value is not 32 bytes", "bad_digest")
        return value.hex() if value is not None else None

    # -- one upload -------------------------------------------------------------------------

    def retrieve(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        """Offset retrieval (HEAD, and GET, which the draft gives no content)."""
        dialect = self._dialect(req)
        self.cut_bodies.wait(upload_id, req.env)
        session = self._session(req, upload_id)
        resp.set_header("Cache-Control", "no-store")
        resp.set_header("Upload-Offset", str(session.bytes_written))
        resp.set_header(*dialect.completeness(session.state == states.COMPLETED))
        known = session.total_bytes
        length = known if known is not None else session.announced_length
        if length is not None:
            resp.set_header("Upload-Length", str(length))
        limit = self.limit(dialect, session)
        if limit:
            resp.set_header("Upload-Limit", limit)
        if session.sha256 and session.state == states.COMPLETED:
            resp.set_header("Repr-Digest", repr_digest(session.sha256))
        resp.status = falcon.HTTP_204

    def append(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        """Upload append: the content at `Upload-Offset`, completing the upload on `?1`."""
        dialect = self._dialect(req)
        media = (req.content_type or "").split(";")[0].strip().lower()
        if dialect.append_type and media != dialect.append_type:
            raise _problem(
                f"an append needs Content-Type {dialect.append_type}", "bad_content_type", 415
            )
        complete, announced = self._parse(req, dialect)
        if complete is None:
            raise _problem(f"an append needs {dialect.complete_header}", "bad_header")
        try:
            offset = draft.parse_integer("Upload-Offset", req.get_header("Upload-Offset"))
        except draft.DraftHeaderError as exc:
            raise _problem(str(exc), exc.code) from None
        if offset is None:
            raise _problem("an append needs Upload-Offset", "bad_header")
        req.context.draft_offset = offset
        self.cut_bodies.wait(upload_id, req.env)
        session = self._session(req, upload_id)
        session = self._append(req, dialect, session, offset, complete, announced)
        self._answer(req, resp, dialect, session, falcon.HTTP_204)
        if session.state == states.COMPLETED:
            resp.status = falcon.HTTP_200

    def _append(
        self,
        req: falcon.Request,
        dialect: draft.Dialect,
        session: Session,
        offset: int,
        complete: bool,
        announced: int | None,
    ) -> Session:
        """Under the upload's lock (waited for: a draft client cannot retry a 423), check the
        session rules and hand the content to the writer."""
        length = req.content_length or 0
        with self.locks.hold(session.id, wait=LOCK_WAIT):
            session = self._session(req, session.id)
            if lifecycle.is_repeat_of_last_append(session, offset, length) and complete:
                return session  # the final answer was lost: the same answer again
            if session.state == states.COMPLETED:
                raise lifecycle.Refusal(
                    lifecycle.COMPLETED,
                    "the upload is already complete",
                    offset=session.bytes_written,
                )
            declared = lifecycle.draft_length(
                session, offset, length, complete=complete, announced=announced
            )
            limit = self.service.config.max_upload_size
            self._check_size(max(offset + length, announced or 0))
            if declared is not None:
                self._recheck(req, declared)
            lifecycle.check_append(session, offset, length, declared=declared, max_size=limit)
            # A length announced here for the first time is recorded (by the writer, with the bytes).
            announce = announced if declared is None and session.announced_length is None else None
            if not length and declared is None and announce is None:
                return session  # nothing to store, nothing to complete, nothing to record
            try:
                checksum = draft.known_digest("Content-Digest", req.get_header("Content-Digest"))
            except draft.DraftHeaderError as exc:
                raise _problem(str(exc), "bad_digest") from None
            with open_body(req, self.service, limit=limit) as body:
                return self.service.append(session, body, offset, checksum, declared, announce)

    @staticmethod
    def _recheck(req: falcon.Request, length: int) -> None:
        """Time of check, time of use: 'the server SHOULD validate that the user is still allowed
        to perform the requested action before finalizing the upload'. The credential was checked
        on this request itself; its size allowance is checked again against the final length."""
        principal = req.context.principal
        if principal is not None and principal.max_size is not None and length > principal.max_size:
            raise _problem(
                f"this token allows uploads of at most {principal.max_size} bytes",
                "token_size_exceeded",
                413,
            )

    def cancel(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        self._dialect(req)
        self.cut_bodies.wait(upload_id, req.env)  # an append still arriving is ended first
        session = self._session(req, upload_id)
        with self.locks.hold(upload_id, wait=30.0):
            self.service.control(session, lifecycle.TERMINATE, completed_too=True)
        resp.status = falcon.HTTP_204


class _Route:
    """One path, two protocols: the draft's requests to `DraftResources`, the rest to tus."""

    def __init__(self, tus_resource: Any, drafts: DraftResources) -> None:
        self.tus = tus_resource
        self.drafts = drafts

    @staticmethod
    def _is_draft(req: falcon.Request) -> bool:
        return draft.speaks_draft(req.get_header)

    def _tus(self, name: str, req: falcon.Request, resp: falcon.Response, **params: Any) -> None:
        responder = getattr(self.tus, name, None)
        if responder is None:
            raise falcon.HTTPMethodNotAllowed(
                [m[3:].upper() for m in dir(self.tus) if m.startswith("on_")]
            )
        responder(req, resp, **params)


class CollectionRoute(_Route):
    def on_options(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.tus.on_options(req, resp)
        self.drafts.options(req, resp)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self._is_draft(req):
            self.drafts.create(req, resp)
        else:
            self._tus("on_post", req, resp)

    def on_put(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self._is_draft(req):
            self.drafts.create(req, resp)
        else:
            self._tus("on_put", req, resp)

    on_patch = on_put


class UploadRoute(_Route):
    def on_options(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        self.tus.on_options(req, resp, upload_id)

    def on_head(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        if self._is_draft(req):
            self.drafts.retrieve(req, resp, upload_id)
        else:
            self.tus.on_head(req, resp, upload_id)

    def on_get(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        if self._is_draft(req):
            self.drafts.retrieve(req, resp, upload_id)
        else:
            self.tus.on_get(req, resp, upload_id)

    def on_patch(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        if self._is_draft(req):
            self.drafts.append(req, resp, upload_id)
        else:
            self.tus.on_patch(req, resp, upload_id)

    def on_delete(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        if self._is_draft(req):
            self.drafts.cancel(req, resp, upload_id)
        else:
            self.tus.on_delete(req, resp, upload_id)
