"""Operations on sessions, shared by every protocol the front end speaks.

HTTP resources parse a request and call one method here; this module turns it into records, spool
files and messages to the writer pool, and turns a writer's refusal into a `Refusal`. It never
moves file contents through Python and never touches upload data: that is the writers' job.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from workers.messages import Append, Concat, Event
from workers.pool import WriterPool, WriterUnavailable

from . import errors, hooks_tusd, metrics
from .auth import Principal, check_upload
from .config import Config
from .filenames import sanitize
from .hooks import Hooks
from .in_progress import InProgress
from .layout import Layout
from .received_body import RequestBody
from .session_limits import SessionLimits
from .sessions import lifecycle
from .sessions import record as states
from .sessions.directory import LocalDirectory, SessionDirectory
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
    principal: Principal | None = None
    client: str | None = None  # `clients.client_key` of the creating request: for limits only
    concat: str | None = None
    parts: tuple[str, ...] = ()
    announced_length: int | None = None  # the IETF draft: a length announced before completion

    @property
    def owner(self) -> str | None:
        return self.principal.id if self.principal else None

    @property
    def limit_key(self) -> str | None:
        """See `Session.limit_key`: the credential, or with auth off the client."""
        return self.owner if self.owner is not None else self.client

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
            "parts": list(self.parts),
        }


@dataclass(frozen=True)
class SeedFile:
    """One file part of a seed form: what is known of it, and where it lies in the body."""

    new: NewUpload
    start: int
    end: int


class SessionService:
    """The front end's operations on sessions, for every protocol: create (limits, the pre-create
    hook, the spool), look up, command, append and concatenate, each by a message to the session's
    writer whose answer becomes the record or a `Refusal`. It holds the limits on unfinished
    sessions and the spool; the stores, the storage, the writer pool, the hooks and the session
    directory are given to it (`Runtime` builds them; the in-process tests give stand-ins)."""

    def __init__(
        self,
        config: Config,
        layout: Layout,
        live: LiveSessions,
        store: SessionStore,
        storage: Storage,
        pool: WriterPool,
        hooks: Hooks,
        directory: SessionDirectory | None = None,
    ) -> None:
        self.config = config
        self.layout = layout
        self.live = live
        self.store = store
        self.storage = storage
        self.pool = pool
        self.hooks = hooks
        # one server's unless given (`Backends.open_directory` picks by the settings)
        self.directory = directory if directory is not None else LocalDirectory(live, store)
        self.spool = Spool(layout, sync=config.fsync == "always")
        recovered = live.all()  # once, at start-up: from here on both follow the sessions' events
        self.limits = SessionLimits(config.max_sessions, config.max_sessions_per_owner, recovered)
        self.in_progress = InProgress(recovered, metrics.get().active_sessions.set)
        pool.on_event = self._on_writer_event
        pool.on_record = lambda record: self.in_progress.observe(record["id"], record["state"])
        hooks.on_stop = self._stop_upload
        self.claims = hooks_tusd.IdClaims(lambda i: self.directory.lookup(i) is not None)

    # -- lookup -------------------------------------------------------------------------------

    def get(self, session_id: str | None, principal: Principal | None = None) -> Session:
        """The session's record (from the live view, or the store once it has left it), or
        NotFound: also for ids that cannot be ours, and for a session that belongs to another
        credential (as if it did not exist)."""
        if not session_id:
            raise errors.BadRequest(
                "the sessionID parameter is required", code="missing_session_id"
            )
        session = self.directory.lookup(session_id) if is_session_id(session_id) else None
        if session is None or (principal is not None and session.owner != principal.id):
            raise errors.NotFound(f"no upload session {session_id!r}", code="unknown_session")
        return session

    def all_sessions(self) -> list[Session]:
        """The sessions the sweeper looks at: this server's live view, or with several nodes
        every unfinished record (the shared index, never the whole history)."""
        return self.directory.all()

    # -- creation -----------------------------------------------------------------------------

    def create(self, new: NewUpload) -> Session:
        """Record a new session (durably, then in the live view) pinned to a writer."""
        session = self._new_session(new)
        with self._releasing_on_failure(session):
            self._save(session)
        return session

    def create_seeds(self, files: Sequence[SeedFile], body: RequestBody) -> list[Session]:
        """Create one seed session per file of a form, all or none: every limit and the
        pre-create hook agree to every file before a byte is spooled, and a failure on any file
        (a limit, a hook, a full disk) takes back the sessions of the others, so a refused form
        leaves nothing for its client to find or to store twice on retry.

        Each spool is whole before its record exists, so a crash in between leaves only an orphan
        spool file (swept later), never a session that claims data it does not have."""
        sessions: list[Session] = []
        saved: list[Session] = []
        key = body.key()
        follower = self.pool.followed(key) if key is not None else None
        try:
            for file in files:
                writer = follower if not sessions else None  # its writer hashed the first part
                sessions.append(self._new_session(file.new, writer=writer))
            # the first part last: linking it as its spool cuts the body's file at its end
            for session, file in reversed(list(zip(sessions, files, strict=True))):
                self._spool_seed(session, body, file.start, file.end)
            if key is not None and follower is not None and body.starts_file(files[0].start):
                self.pool.claim_digest(sessions[0], key, files[0].end - files[0].start)
            for session in sessions:
                self._save(session)
                saved.append(session)
        except BaseException:
            for session in sessions:
                self.limits.release(session.limit_key, session.id)
                self.claims.release(session.id)
                self.layout.spool(session.id).unlink(missing_ok=True)
            for session in saved:
                self.in_progress.discard(session.id)
                with contextlib.suppress(Exception):
                    self.live.remove(session.id)
                    self.store.delete(session.id)
            raise
        for session, file in zip(sessions, files, strict=True):
            self.pool.drain(session)
            metrics.get().bytes_received.labels(states.SEED).inc(file.end - file.start)
        return sessions

    def _new_session(self, new: NewUpload, writer: int | None = None) -> Session:
        """Check every limit and ask the pre-create hook; nothing is stored before both agree.
        It is pinned to `writer` if given, else to the next one in turn.
        The new session holds its place in the limits from here on (checked and taken at once,
        so concurrent creations cannot overshoot them); a failure before it is saved gives the
        place back."""
        size = new.total_bytes if new.total_bytes is not None else new.announced_length
        if size is not None and size > self.config.max_upload_size:
            raise errors.TooLarge(
                f"the upload is {size} bytes; the limit is {self.config.max_upload_size}",
                code="upload_too_large",
            )
        check_upload(new.principal, size, new.filename, new.filetype)
        session_id = new_session_id()
        self.limits.take(new.limit_key, session_id, by_client=new.owner is None)
        try:
            copies = 2 if new.protocol == states.SEED else 1  # a seed upload is spooled whole
            if self.config.storage != "local":
                copies -= 1  # the data itself goes to remote storage
            self.check_space((size or 0) * copies)
            answer = self.hooks.pre_create(new.describe())
            if answer is not None and answer.change_metadata is not None:
                new = hooks_tusd.with_metadata(new, answer.change_metadata)
            if answer is not None and answer.change_id is not None:
                self.claims.take(answer.change_id)
                self.limits.release(new.limit_key, session_id)
                session_id = answer.change_id
                self.limits.take(new.limit_key, session_id, by_client=new.owner is None)
            session = Session(
                id=session_id,
                protocol=new.protocol,
                filename=sanitize(new.filename, fallback=session_id),
                chunk_size=self.config.chunk_size,
                writer=self.pool.assign() if writer is None else writer,
                total_bytes=new.total_bytes,
                state=states.QUEUED if new.protocol == states.SEED else states.WAITING,
                filetype=new.filetype,
                metadata=dict(new.metadata or {}),
                metadata_header=new.metadata_header,
                expected_sha256=new.expected_sha256,
                owner=new.owner,
                client=new.client,
                concat=new.concat,
                parts=list(new.parts),
                announced_length=new.announced_length,
                node=self.directory.node_id,
            )
        except BaseException:
            self.limits.release(new.limit_key, session_id)
            self.claims.release(session_id)
            raise
        if self.config.expiry:
            session.expires_at = session.created_at + self.config.expiry
        return session

    @contextlib.contextmanager
    def _releasing_on_failure(self, session: Session) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.limits.release(session.limit_key, session.id)
            self.claims.release(session.id)
            raise

    def _save(self, session: Session) -> None:
        # under on-complete, a new record is written atomically but not synced: a power loss
        # can only cost an upload that had not completed, which that policy accepts
        self.store.save(session, durable=self.config.fsync == "always")
        self.live.put(session)
        self.claims.release(session.id)
        hooks_tusd.current().created.add(session.id)
        self.limits.count(session)
        self.in_progress.observe(session.id, session.state)
        metrics.get().uploads_started.labels(session.protocol).inc()
        self.hooks.emit("post-create", session)

    # -- the disk ------------------------------------------------------------------------------

    def space_refusal(self, needed: int) -> str | None:
        """Why `needed` more bytes would leave less than --min-free-space on the upload disk, or
        None (always None with a reserve of 0: the writers then meet a full disk as ENOSPC)."""
        if not self.config.min_free_space:
            return None
        free = shutil.disk_usage(self.layout.root).free
        if free - needed >= self.config.min_free_space:
            return None
        return (
            f"the server cannot store {needed} more bytes (free {free}, reserve "
            f"{self.config.min_free_space})"
        )

    def check_space(self, needed: int) -> None:
        """Refuse (507) bytes that do not fit above the free-space reserve."""
        refusal = self.space_refusal(needed)
        if refusal:
            raise errors.InsufficientStorage(refusal, code="insufficient_storage")

    def _on_writer_event(self, event: Event) -> None:
        """Called by the pool's monitor thread: keep the limits' index and the count in progress
        current, tell the hooks."""
        session = Session.from_dict(event.session)
        self.in_progress.observe(session.id, session.state)
        if session.is_final:
            self.limits.ended(session)
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
            self.hooks.emit(hook, session)

    def _spool_seed(self, session: Session, body: RequestBody, start: int, end: int) -> None:
        try:
            # bytes already in the upload data need not be spooled again (they stay a hole)
            stored = (
                0
                if session.spooled or not session.bytes_written
                else min(self.storage.size(session.id) or 0, session.bytes_written)
            )
            self.spool.write_seed(session.id, body, start, end, skip=stored)
        except OSError as exc:
            raise _storage_error(exc) from None

    # -- control ------------------------------------------------------------------------------

    def control(self, session: Session, action: str, **args: Any) -> Session:
        """Have the session's writer apply a command; its refusal becomes an UploadError. With
        several nodes, the writer of the node holding the upload (`SessionDirectory.route`). A
        client's termination asks the pre-terminate hook first (tusd format)."""
        if action == lifecycle.TERMINATE:
            self.hooks.pre_terminate(session)
        return self.directory.route(session, action, args, self.control_here)

    def _stop_upload(self, session_id: str) -> None:
        """A post-receive hook said StopUpload: end the upload, as tusd does (in a thread of its
        own: the hooks' delivery thread must not wait for a writer)."""

        def stop() -> None:
            with contextlib.suppress(errors.UploadError, lifecycle.Refusal):
                self.control(self.get(session_id), lifecycle.TERMINATE)

        threading.Thread(target=stop, name=f"stop-{session_id}", daemon=True).start()

    def control_here(self, session: Session, action: str, args: dict[str, Any]) -> Session:
        """Apply a command with this server's writer. A seed upload resumes from its spool, so
        this server must have all of it."""
        if (
            action == lifecycle.RESUME
            and session.protocol == states.SEED
            and self.spool.seed_size(session.id) != session.total_bytes
        ):
            raise errors.Conflict(
                "the server no longer holds this upload's data: resume it by sending the file again "
                "as the 'file' field",
                code="spool_missing",
            )
        reply = self._call(lambda: self.pool.control(session, action, REPLY_TIMEOUT, **args))
        return self._result(reply)

    def control_from_peer(self, session_id: str, action: str, args: dict[str, Any]) -> Session:
        """A command another node sent here because this node holds the upload."""
        session = self.get(session_id)
        return self.directory.run_here(session_id, lambda: self.control_here(session, action, args))

    def resume(self, session: Session, body: RequestBody | None, part: Any | None) -> Session:
        """Resume an upload. A seed upload continues from a re-sent file if one came, else from
        its spool; a tus upload is released for PATCH requests again."""
        lifecycle.check_command(session, lifecycle.RESUME)
        if session.protocol in states.APPENDED:
            if part is not None:
                raise errors.Conflict(
                    "a tus upload takes its data by PATCH; resume it without a file",
                    code="tus_upload",
                )
            return self.control(session, lifecycle.RESUME)
        if part is None:
            return self.control(session, lifecycle.RESUME)
        if part.size != session.total_bytes:
            raise errors.Conflict(
                f"the file's size differs: {part.size} bytes sent, but this upload is "
                f"{session.total_bytes} bytes; resume with the same file",
                code="size_mismatch",
            )
        if not self.directory.owns(session):
            try:  # the node that spooled it may still have all of it
                return self.control(session, lifecycle.RESUME)
            except errors.Conflict as exc:
                if exc.code != "spool_missing":
                    raise
            return self.directory.run_here(
                session.id, lambda: self._resume_with(session, body, part)
            )
        return self._resume_with(session, body, part)

    def _resume_with(self, session: Session, body: RequestBody | None, part: Any) -> Session:
        """Spool a re-sent file (but the bytes the storage has) and resume the upload from it."""
        self._spool_seed(session, body, part.start, part.end)
        metrics.get().bytes_received.labels(states.SEED).inc(part.size - session.bytes_written)
        return self.control_here(session, lifecycle.RESUME, {})

    # -- appends (tus) ------------------------------------------------------------------------

    def append(
        self,
        session: Session,
        body: RequestBody,
        offset: int,
        checksum: tuple[str, bytes] | None = None,
        declare_length: int | None = None,
        announce_length: int | None = None,
    ) -> Session:
        """Spool a request body for `offset` and wait until the writer has stored (or refused) it."""
        segment = ""
        if body.length:
            self.check_space(body.length)
            try:
                segment = str(self.spool.write_segment(session.id, offset, body, 0, body.length))
            except OSError as exc:
                raise _storage_error(exc) from None
            metrics.get().bytes_received.labels(session.protocol).inc(body.length)
        message = Append(
            self.pool.next_request_id(),
            session.id,
            segment,
            offset,
            body.length,
            checksum,
            declare_length,
            announce_length,
        )
        return self._finishing(session, lambda: self.pool.append(session, message, REPLY_TIMEOUT))

    def concat(self, session: Session) -> Session:
        """Have the writer build a final upload from its (complete) partial uploads."""
        message = Concat(self.pool.next_request_id(), session.id, tuple(session.parts))
        return self._finishing(session, lambda: self.pool.concat(session, message, REPLY_TIMEOUT))

    def _finishing(self, session: Session, request: Any) -> Session:
        """The writer's answer to a request that may complete the upload; if it did, the
        pre-finish hook is asked before the request is answered. An upload a post-receive hook
        stopped answers as that hook asked."""
        try:
            result = self._result(self._call(request))
        except lifecycle.Refusal:
            stopped = self.hooks.stopped.pop(session.id, None)
            if stopped is not None:
                raise hooks_tusd.HookAnswered(
                    "upload_stopped", "upload has been stopped by server", 400, stopped
                ) from None
            raise
        if result.state == states.COMPLETED and session.state != states.COMPLETED:
            self.hooks.pre_finish(result)
        return result

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
        """The record after the writer's work, or its refusal (the API answers it by protocol)."""
        session = Session.from_dict(reply.session) if reply.session else None
        if not reply.ok:
            offset = session.bytes_written if session is not None else None
            raise lifecycle.Refusal(reply.code, reply.message, offset=offset)
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
