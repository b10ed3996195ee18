"""Operations on sessions, shared by every protocol the front end speaks.

HTTP resources parse a request and call one method here; this module turns it into records, spool
files and messages to the writer pool, and turns a writer's refusal into an `UploadError`. It never
moves file contents through Python and never touches upload data: that is the writers' job.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Any

from workers.messages import Append, Concat
from workers.pool import WriterPool, WriterUnavailable

from . import errors
from .body import RequestBody
from .config import Config
from .filenames import sanitize
from .layout import Layout
from .sessions import record as states
from .sessions.live import LiveSessions
from .sessions.record import Session, is_session_id, new_session_id
from .sessions.store import SessionStore
from .spool import Spool
from .storage import Storage

log = logging.getLogger("upload_server.service")

# How long a request may wait for its writer: generous, since a rate limit can make a writer slow.
REPLY_TIMEOUT = 120.0


@dataclass(frozen=True)
class NewUpload:
    """What a protocol knows about an upload when it creates one."""

    protocol: str
    filename: str | None
    total_bytes: int | None
    filetype: str | None = None
    metadata: dict[str, str | None] | None = None
    metadata_header: str | None = None
    expected_sha256: str | None = None
    owner: str | None = None
    concat: str | None = None
    parts: tuple[str, ...] = ()


class Uploads:
    def __init__(
        self,
        config: Config,
        layout: Layout,
        live: LiveSessions,
        store: SessionStore,
        storage: Storage,
        pool: WriterPool,
    ) -> None:
        self.config = config
        self.layout = layout
        self.live = live
        self.store = store
        self.storage = storage
        self.pool = pool
        self.spool = Spool(layout, sync=config.fsync == "always")

    # -- lookup -------------------------------------------------------------------------------

    def get(self, session_id: str | None) -> Session:
        """The live record, or NotFound (also for ids that cannot be ours)."""
        if not session_id:
            raise errors.BadRequest(
                "the sessionID parameter is required", code="missing_session_id"
            )
        session = self.live.get(session_id) if is_session_id(session_id) else None
        if session is None:
            raise errors.NotFound(f"no upload session {session_id!r}", code="unknown_session")
        return session

    # -- creation -----------------------------------------------------------------------------

    def create(self, new: NewUpload) -> Session:
        """Record a new session (durably, then in the live view) and pin it to a writer."""
        if new.total_bytes is not None and new.total_bytes > self.config.max_upload_size:
            raise errors.TooLarge(
                f"the upload is {new.total_bytes} bytes; the limit is {self.config.max_upload_size}",
                code="upload_too_large",
            )
        session_id = new_session_id()
        session = Session(
            id=session_id,
            protocol=new.protocol,
            filename=sanitize(new.filename, fallback=session_id),
            chunk_size=self.config.chunk_size,
            writer=self.pool.assign(),
            total_bytes=new.total_bytes,
            state=states.QUEUED if new.protocol == states.SEED else states.WAITING,
            filetype=new.filetype,
            metadata=dict(new.metadata or {}),
            metadata_header=new.metadata_header,
            expected_sha256=new.expected_sha256,
            owner=new.owner,
            concat=new.concat,
            parts=list(new.parts),
        )
        if self.config.expiry:
            session.expires_at = session.created_at + self.config.expiry
        self.store.save(session, durable=self.config.fsync != "never")
        self.live.put(session)
        return session

    def start_seed(self, session: Session, body: RequestBody, start: int, end: int) -> None:
        """Spool a seed upload's file part and hand the session to its writer."""
        self._spool_seed(session, body, start, end)
        self.pool.drain(session)

    def _spool_seed(self, session: Session, body: RequestBody, start: int, end: int) -> None:
        try:
            self.spool.write_seed(session.id, body, start, end, skip=session.bytes_written)
        except OSError as exc:
            raise _storage_error(exc) from None

    # -- control ------------------------------------------------------------------------------

    def control(self, session: Session, action: str, **args: Any) -> Session:
        """Have the session's writer apply a command; its refusal becomes an UploadError."""
        reply = self._call(lambda: self.pool.control(session, action, REPLY_TIMEOUT, **args))
        result = self._result(reply)
        if result.is_final:
            self.pool.forget(session.id)
        return result

    def resume(self, session: Session, body: RequestBody | None, part: Any | None) -> Session:
        """Resume an upload. A seed upload continues from a re-sent file if one came, else from
        its spool; a tus upload is released for PATCH requests again."""
        resumable = (states.PAUSED, states.FAILED)
        if session.protocol == states.SEED:
            resumable += (states.WAITING,)  # its spool was lost: the client sends the file again
        if session.state not in resumable:
            raise errors.Conflict(f"the upload is {session.state}, not paused", code="not_paused")
        if session.protocol == states.TUS:
            if part is not None:
                raise errors.Conflict(
                    "a tus upload takes its data by PATCH; resume it without a file",
                    code="tus_upload",
                )
        elif part is not None:
            if part.size != session.total_bytes:
                raise errors.Conflict(
                    f"the file sent is {part.size} bytes but this upload is {session.total_bytes}; "
                    "resume with the same file",
                    code="size_mismatch",
                )
            self._spool_seed(session, body, part.start, part.end)
        elif self.spool.seed_size(session.id) != session.total_bytes:
            raise errors.Conflict(
                "the server no longer holds this upload's data: resume it by sending the file again "
                "as the 'file' field",
                code="spool_missing",
            )
        return self.control(session, "resume")

    # -- appends (tus) ------------------------------------------------------------------------

    def append(
        self,
        session: Session,
        body: RequestBody,
        offset: int,
        checksum: tuple[str, bytes] | None = None,
        declare_length: int | None = None,
    ) -> Session:
        """Spool a request body for `offset` and wait until the writer has stored (or refused) it."""
        segment = ""
        if body.length:
            try:
                segment = str(self.spool.write_segment(session.id, offset, body, 0, body.length))
            except OSError as exc:
                raise _storage_error(exc) from None
        message = Append(
            self.pool.next_request_id(),
            session.id,
            segment,
            offset,
            body.length,
            checksum,
            declare_length,
        )
        return self._result(self._call(lambda: self.pool.append(session, message, REPLY_TIMEOUT)))

    def concat(self, session: Session) -> Session:
        """Have the writer build a final upload from its (complete) partial uploads."""
        message = Concat(self.pool.next_request_id(), session.id, tuple(session.parts))
        return self._result(self._call(lambda: self.pool.concat(session, message, REPLY_TIMEOUT)))

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _call(request: Any) -> Any:
        try:
            return request()
        except WriterUnavailable as exc:
            raise errors.Unavailable(
                str(exc), code="writer_unavailable", headers={"Retry-After": "1"}
            ) from None

    @staticmethod
    def _result(reply: Any) -> Session:
        session = Session.from_dict(reply.session) if reply.session else None
        if not reply.ok:
            extra = {"offset": session.bytes_written} if session is not None else {}
            raise errors.UploadError(reply.message, code=reply.code, status=reply.status, **extra)
        assert session is not None
        return session


def _storage_error(exc: OSError) -> errors.UploadError:
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return errors.InsufficientStorage(
            "the server's disk is full; try again later", code="disk_full"
        )
    log.error("spooling failed: %s", exc)
    return errors.UploadError(
        f"the server could not store the upload: {exc.strerror or exc}", code="io_error", status=500
    )
