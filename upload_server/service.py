"""Operations on sessions, shared by every protocol the front end speaks.

HTTP resources parse a request and call one method here; this module turns it into records, spool
files and messages to the writer pool, and turns a writer's refusal into an `UploadError`. It never
moves file contents through Python and never touches upload data: that is the writers' job.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
from dataclasses import dataclass
from typing import Any

from workers.messages import Append, Concat, Event
from workers.pool import WriterPool, WriterUnavailable

from . import errors, metrics
from .auth import Principal, check_upload
from .body import RequestBody
from .config import Config
from .filenames import sanitize
from .hooks import Hooks
from .layout import Layout
from .sessions import record as states
from .sessions.live import LiveSessions
from .sessions.record import Session, is_session_id, new_session_id
from .sessions.store import SessionStore
from .spool import Spool
from .status import status_of
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
    principal: Principal | None = None
    concat: str | None = None
    parts: tuple[str, ...] = ()

    @property
    def owner(self) -> str | None:
        return self.principal.id if self.principal else None

    def describe(self) -> dict[str, Any]:
        """What a pre-create hook is told."""
        return {
            "protocol": self.protocol,
            "filename": self.filename,
            "totalBytes": self.total_bytes,
            "filetype": self.filetype,
            "metadata": self.metadata or {},
            "owner": self.owner,
            "concat": self.concat,
        }


class Uploads:
    def __init__(
        self,
        config: Config,
        layout: Layout,
        live: LiveSessions,
        store: SessionStore,
        storage: Storage,
        pool: WriterPool,
        hooks: Hooks,
    ) -> None:
        self.config = config
        self.layout = layout
        self.live = live
        self.store = store
        self.storage = storage
        self.pool = pool
        self.hooks = hooks
        self.spool = Spool(layout, sync=config.fsync == "always")
        self._active: dict[str | None, set[str]] = {}
        self._active_lock = threading.Lock()
        for session in live.all():
            if not session.is_final:
                self._active.setdefault(session.owner, set()).add(session.id)
        pool.on_event = self._on_writer_event

    # -- lookup -------------------------------------------------------------------------------

    def get(self, session_id: str | None, principal: Principal | None = None) -> Session:
        """The live record, or NotFound: also for ids that cannot be ours, and for a session that
        belongs to another credential (as if it did not exist)."""
        if not session_id:
            raise errors.BadRequest(
                "the sessionID parameter is required", code="missing_session_id"
            )
        session = self.live.get(session_id) if is_session_id(session_id) else None
        if session is None or (principal is not None and session.owner != principal.id):
            raise errors.NotFound(f"no upload session {session_id!r}", code="unknown_session")
        return session

    # -- creation -----------------------------------------------------------------------------

    def create(self, new: NewUpload) -> Session:
        """Record a new session (durably, then in the live view) pinned to a writer."""
        session = self._new_session(new)
        self._save(session)
        return session

    def create_seed(self, new: NewUpload, body: RequestBody, start: int, end: int) -> Session:
        """Spool a seed upload's file part, record the session, and hand it to its writer.

        The spool is whole before the record exists, so a crash in between leaves only an orphan
        spool file (swept later), never a session that claims data it does not have."""
        session = self._new_session(new)
        self._spool_seed(session, body, start, end)
        self._save(session)
        self.pool.drain(session)
        metrics.get().bytes_received.labels(states.SEED).inc(end - start)
        return session

    def _new_session(self, new: NewUpload) -> Session:
        """Check every limit and ask the pre-create hook; nothing is stored before both agree."""
        if new.total_bytes is not None and new.total_bytes > self.config.max_upload_size:
            raise errors.TooLarge(
                f"the upload is {new.total_bytes} bytes; the limit is {self.config.max_upload_size}",
                code="upload_too_large",
            )
        check_upload(new.principal, new.total_bytes, new.filename, new.filetype)
        self._check_session_limits(new.owner)
        copies = 2 if new.protocol == states.SEED else 1  # a seed upload is spooled whole first
        self.check_space((new.total_bytes or 0) * copies)
        self.hooks.pre_create(new.describe())
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
        return session

    def _save(self, session: Session) -> None:
        # under on-complete, a new record is written atomically but not synced: a power loss
        # can only cost an upload that had not completed, which that policy accepts
        self.store.save(session, durable=self.config.fsync == "always")
        self.live.put(session)
        with self._active_lock:
            self._active.setdefault(session.owner, set()).add(session.id)
        metrics.get().uploads_started.labels(session.protocol).inc()
        self.hooks.emit("post-create", status_of(session))

    def active_count(self) -> int:
        """Unfinished sessions (those the session limits count)."""
        with self._active_lock:
            return sum(len(ids) for ids in self._active.values())

    # -- limits -------------------------------------------------------------------------------

    def _check_session_limits(self, owner: str | None) -> None:
        with self._active_lock:
            mine = len(self._active.get(owner, ()))
            everyone = sum(len(ids) for ids in self._active.values())
        if mine >= self.config.max_sessions_per_owner:
            raise errors.UploadError(
                f"this credential already has {mine} unfinished uploads; finish or terminate some",
                code="too_many_sessions",
                status=429,
            )
        if everyone >= self.config.max_sessions:
            raise errors.UploadError(
                "the server has too many unfinished uploads; try again later",
                code="server_busy",
                status=429,
                headers={"Retry-After": "60"},
            )

    def check_space(self, needed: int) -> None:
        """Refuse (507) bytes that would leave less than --min-free-space on the upload disk
        (0 turns the check off: the writers then meet a full disk as ENOSPC)."""
        if not self.config.min_free_space:
            return
        free = shutil.disk_usage(self.layout.root).free
        if free - needed < self.config.min_free_space:
            raise errors.InsufficientStorage(
                f"the server cannot store {needed} more bytes (free {free}, reserve "
                f"{self.config.min_free_space})",
                code="insufficient_storage",
            )

    def _on_writer_event(self, event: Event) -> None:
        """Called by the pool's monitor thread: keep the limits' index current, tell the hooks."""
        session = Session.from_dict(event.session)
        if session.is_final:
            with self._active_lock:
                self._active.get(session.owner, set()).discard(session.id)
            self.pool.forget(session.id)
        figures = metrics.get()
        if event.kind == "completed":
            figures.uploads_completed.labels(session.protocol).inc()
        elif event.kind == "failed":
            reason = session.error["code"] if session.error else "unknown"
            figures.uploads_failed.labels(session.protocol, reason).inc()
        elif event.kind in ("terminated", "expired"):
            figures.uploads_ended.labels(event.kind).inc()
        hook = _HOOK_OF_EVENT.get(event.kind)
        if hook:
            self.hooks.emit(hook, status_of(session))

    def _spool_seed(self, session: Session, body: RequestBody, start: int, end: int) -> None:
        try:
            # bytes already in the upload data need not be spooled again (they stay a hole)
            stored = (
                0
                if session.spooled
                else min(self.storage.size(session.id) or 0, session.bytes_written)
            )
            self.spool.write_seed(session.id, body, start, end, skip=stored)
        except OSError as exc:
            raise _storage_error(exc) from None

    # -- control ------------------------------------------------------------------------------

    def control(self, session: Session, action: str, **args: Any) -> Session:
        """Have the session's writer apply a command; its refusal becomes an UploadError."""
        reply = self._call(lambda: self.pool.control(session, action, REPLY_TIMEOUT, **args))
        return self._result(reply)

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
            metrics.get().bytes_received.labels(states.SEED).inc(part.size - session.bytes_written)
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
            self.check_space(body.length)
            try:
                segment = str(self.spool.write_segment(session.id, offset, body, 0, body.length))
            except OSError as exc:
                raise _storage_error(exc) from None
            metrics.get().bytes_received.labels(states.TUS).inc(body.length)
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


_HOOK_OF_EVENT = {
    "progress": "progress",
    "completed": "post-finish",
    "terminated": "post-terminate",
    "expired": "post-terminate",
}


def _storage_error(exc: OSError) -> errors.UploadError:
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return errors.InsufficientStorage(
            "the server's disk is full; try again later", code="disk_full"
        )
    log.error("spooling failed: %s", exc)
    return errors.UploadError(
        f"the server could not store the upload: {exc.strerror or exc}", code="io_error", status=500
    )
