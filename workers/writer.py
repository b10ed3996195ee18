"""A writer process: moves spooled bytes into upload data, one chunk at a time.

A writer owns the sessions pinned to it: after creation, only it changes their records. It keeps a
round-robin list of tasks (a seed drain, a tus append, a concatenation), each a generator that copies
one chunk per step, so a long upload never starts the others on the same writer, and between chunks it
reads its inbox, where a `Nudge` points it at a session's control queue. Each chunk is hashed (the
whole file's SHA-256, plus a tus Upload-Checksum) from an mmap window of the spool, and written from
that same window: no Python copy of the bytes.

After every chunk the session's record is replaced in the Manager dict (the live view); durable
checkpoints follow the fsync policy. The durable offset never runs ahead of the data: data is written
(and synced, with `fsync=always`) before the record that counts it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import logging
import os
import time
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from queue import Empty
from typing import Any

from upload_server import fileio, logs, metrics, processes
from upload_server.layout import Layout
from upload_server.sessions import record as states
from upload_server.sessions.live import LiveSessions
from upload_server.sessions.record import Session
from upload_server.sessions.store import FileSessionStore, SessionStore
from upload_server.storage import LocalStorage, Storage, UploadData

from .messages import (
    EXPIRE,
    PAUSE,
    RESUME,
    TERMINATE,
    Append,
    Command,
    Concat,
    Drain,
    Event,
    Nudge,
    Ping,
    Reply,
    Shutdown,
)

log = logging.getLogger("upload_server.writer")

CHECKPOINT_INTERVAL = 1.0  # seconds between durable records while a drain runs
PROGRESS_EVENT_INTERVAL = 1.0  # seconds between progress events of one session
PROGRESS, COMMIT, STATE = 0, 1, 2


class Interrupted(Exception):
    """Thrown into a task when a command stops it; `reply` says what its requester is told."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Refused(Exception):
    """A request the writer will not carry out (the front end's checks raced with a change)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Held:
    """What the writer holds for one session while it works on it."""

    session: Session
    data: UploadData | None = None
    sha256: Any = None  # hashlib object over [0, bytes_written), None until needed
    last_checkpoint: float = 0.0
    last_progress_event: float = 0.0


@dataclass
class Task:
    session_id: str
    steps: Generator[int, None, None]
    message: Append | Concat | Drain
    next_time: float = 0.0

    @property
    def request_id(self) -> int | None:
        return getattr(self.message, "request_id", None)


@dataclass(frozen=True)
class WriterSettings:
    index: int
    upload_dir: str
    chunk_size: int
    max_bytes_per_second: int
    fsync: str
    expiry: float


class Writer:
    def __init__(
        self,
        settings: WriterSettings,
        inbox: Connection,
        replies: Connection,
        live: LiveSessions,
        store: SessionStore,
        storage: Storage,
        layout: Layout,
    ) -> None:
        self.settings = settings
        self.inbox = inbox
        self.replies = replies
        self.live = live
        self.store = store
        self.storage = storage
        self.layout = layout
        self.held: dict[str, Held] = {}
        self.tasks: deque[Task] = deque()
        self.stopping = False
        self.bytes_written = metrics.get().bytes_written

    # -- the loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        while not self.stopping:
            timeout = self._idle_timeout()
            try:
                ready = self.inbox.poll(timeout)
            except (EOFError, OSError):
                return  # the front end is gone
            if ready:
                try:
                    self._receive_all()
                except EOFError:
                    return
            if not self.stopping:
                self._run_one_step()
        self._checkpoint_all()

    def _idle_timeout(self) -> float | None:
        if not self.tasks:
            return None
        now = time.monotonic()
        return max(0.0, min(t.next_time for t in self.tasks) - now)

    def _receive_all(self) -> None:
        while self.inbox.poll(0):
            self._handle(self.inbox.recv())
            if self.stopping:
                return

    def _handle(self, message: object) -> None:
        if isinstance(message, Nudge):
            self._read_controls(message)
        elif isinstance(message, Append):
            self.tasks.append(Task(message.session_id, self._append(message), message))
        elif isinstance(message, Concat):
            self.tasks.append(Task(message.session_id, self._concat(message), message))
        elif isinstance(message, Drain):
            self._start_drain(message.session_id)
        elif isinstance(message, Ping):
            self.replies.send(Reply(message.request_id))
        elif isinstance(message, Shutdown):
            self.stopping = True
        else:
            log.error("writer %d: unknown message %r", self.settings.index, message)

    def _run_one_step(self) -> None:
        now = time.monotonic()
        for _ in range(len(self.tasks)):
            task = self.tasks[0]
            self.tasks.rotate(-1)
            if task.next_time > now:
                continue
            try:
                copied = next(task.steps)
            except StopIteration:
                self._remove(task)
                return
            except Exception:
                log.exception("writer %d: task for %s failed", self.settings.index, task.session_id)
                self._remove(task)
                self._fail_task(task, "internal_error", "the writer failed; see the server log")
                return
            rate = self.settings.max_bytes_per_second
            if rate:
                task.next_time = max(task.next_time, now) + copied / rate
            return

    def _remove(self, task: Task) -> None:
        with contextlib.suppress(ValueError):
            self.tasks.remove(task)

    def _start_drain(self, session_id: str) -> None:
        if any(isinstance(t.message, Drain) and t.session_id == session_id for t in self.tasks):
            return  # already draining
        self.tasks.append(Task(session_id, self._drain(session_id), Drain(session_id)))

    def _tasks_of(self, session_id: str) -> list[Task]:
        return [t for t in self.tasks if t.session_id == session_id]

    def _reply(self, request_id: int | None, session: Session | None = None, **error: Any) -> None:
        if request_id is None:
            return
        record = session.to_dict() if session is not None else None
        self.replies.send(Reply(request_id, record, **error))

    def _fail_task(self, task: Task, code: str, message: str) -> None:
        """A bug, not a client error: fail the session visibly rather than leave it "writing"."""
        held = self.held.get(task.session_id)
        if held is not None:
            held.session.state = states.FAILED
            held.session.set_error(code, message)
            with contextlib.suppress(Exception):
                self._publish(held, STATE)
        self._reply(
            task.request_id, held.session if held else None, status=500, code=code, message=message
        )

    # -- sessions -------------------------------------------------------------------------

    def _hold(self, session_id: str) -> Held:
        """The session as this writer knows it, reconciled with its data on first touch."""
        held = self.held.get(session_id)
        if held is not None:
            return held
        session = self.live.get(session_id) or self.store.load(session_id)
        if session is None:
            raise Refused(404, "not_found", f"no session {session_id}")
        held = Held(session)
        self.held[session_id] = held
        return held

    def _data(self, held: Held) -> UploadData:
        """Open the session's data; bytes past the recorded offset were never acknowledged."""
        if held.data is None:
            held.data = self.storage.open(held.session.id)
            size = held.data.size()
            if size > held.session.bytes_written:
                held.data.truncate(held.session.bytes_written)
            elif size < held.session.bytes_written:
                log.warning(
                    "session %s: data has %d bytes, record says %d; continuing from the data",
                    held.session.id,
                    size,
                    held.session.bytes_written,
                )
                held.session.bytes_written = size
                held.sha256 = None
        return held.data

    def _hasher(self, held: Held) -> Any:
        """The running SHA-256; after a restart it is rebuilt by reading what was counted so far
        (from the data, or from the spool while the spool is to become the data)."""
        if held.sha256 is None:
            digest = hashlib.sha256()
            if held.session.spooled:
                fd = fileio.open_for_read(self.layout.spool(held.session.id))
                try:
                    for off, n in fileio.windows(0, held.session.bytes_written):
                        with fileio.mapped(fd, off, n) as view:
                            digest.update(view)
                finally:
                    os.close(fd)
            else:
                data = self._data(held)
                for off, n in fileio.windows(0, held.session.bytes_written):
                    with data.view(off, n) as view:
                        digest.update(view)
            held.sha256 = digest
        return held.sha256

    def _publish(self, held: Held, level: int = PROGRESS) -> None:
        """Replace the live record, and the durable one as `level` and the fsync policy ask.

        PROGRESS: durable when a checkpoint is due. COMMIT: durable now (bytes were acknowledged).
        STATE: durable now and synced unless the policy is `never`. Under `fsync=always` data is
        synced before every durable record, so a record never counts unsynced bytes."""
        session = held.session
        session.updated_at = time.time()
        if not session.is_final and self.settings.expiry:
            session.expires_at = session.updated_at + self.settings.expiry
        policy = self.settings.fsync
        now = time.monotonic()
        due = now - held.last_checkpoint >= CHECKPOINT_INTERVAL
        if level > PROGRESS or due or policy == "always":
            if policy == "always" and held.data is not None:
                held.data.sync()
            synced = policy == "always" or (level == STATE and policy != "never")
            self.store.save(session, durable=synced)
            held.last_checkpoint = now
        self.live.put(session)
        if level < STATE and now - held.last_progress_event >= PROGRESS_EVENT_INTERVAL:
            held.last_progress_event = now
            self._emit("progress", session)

    def _emit(self, kind: str, session: Session) -> None:
        self.replies.send(Event(kind, session.to_dict()))

    def _release(self, held: Held) -> None:
        if held.data is not None:
            held.data.close()
        self.held.pop(held.session.id, None)

    def _remove_spool(self, session_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.layout.spool(session_id).unlink()
        for segment in self.layout.spool_dir.glob(f"{session_id}.*.seg"):
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()

    # -- tasks ------------------------------------------------------------------------------

    def _copy(
        self,
        held: Held,
        src_fd: int,
        src_offset: int,
        dst_offset: int,
        length: int,
        extra: Any = None,
    ) -> int:
        """Copy one chunk from a spool file into the data, hashing it on the way."""
        with fileio.mapped(src_fd, src_offset, length) as view:
            self._hasher(held).update(view)
            if extra is not None:
                extra.update(view)
            self._data(held).write(view, dst_offset)
        self.bytes_written.inc(length)
        return length

    def _drain(self, session_id: str) -> Generator[int, None, None]:
        try:
            held = self._hold(session_id)
        except Refused:
            return
        session = held.session
        if session.state not in (states.QUEUED, states.WRITING, states.FAILED, states.WAITING):
            return
        spool = self.layout.spool(session_id)
        try:
            fd = fileio.open_for_read(spool)
        except FileNotFoundError:
            session.state = states.WAITING
            session.set_error(
                "spool_missing",
                "the server no longer holds this upload's data; "
                "resume it by sending the file again",
            )
            self._publish(held, STATE)
            return
        try:
            session.state = states.WRITING
            session.error = None
            if session.spooled or (
                session.bytes_written == 0 and not self.storage.size(session_id)
            ):
                session.spooled = True
                self._publish(held, STATE)
                if (yield from self._verify(held, fd)):
                    os.close(fd)
                    fd = -1  # closed before the rename, which Windows refuses on an open file
                    self._adopt(held, str(spool))
                return
            self._data(held)
            self._publish(held, STATE)
            total = session.total_bytes or 0
            while session.bytes_written < total:
                n = min(self.settings.chunk_size, total - session.bytes_written)
                try:
                    self._copy(held, fd, session.bytes_written, session.bytes_written, n)
                except OSError as exc:
                    self._io_failure(held, exc)
                    return
                except ValueError:  # the spool is shorter than the file: it was cut short
                    self._data(held).truncate(session.bytes_written)
                    self._spool_cut_short(held)
                    return
                session.bytes_written += n
                self._publish(held)
                yield n
                if session.state != states.WRITING:
                    return
            self._finish(held)
        finally:
            if fd >= 0:
                os.close(fd)

    def _verify(self, held: Held, fd: int) -> Generator[int, None, bool]:
        """A seed upload whose spool holds the whole file: hash it chunk by chunk (pause, progress
        and the rate limit work as for a copy); True once all of it is hashed. The spool then
        becomes the data by a rename, so the file is written once, by the front end, and the
        writer only reads it from the page cache."""
        session = held.session
        total = session.total_bytes or 0
        hasher = self._hasher(held)
        while session.bytes_written < total:
            n = min(self.settings.chunk_size, total - session.bytes_written)
            try:
                with fileio.mapped(fd, session.bytes_written, n) as view:
                    hasher.update(view)
                if self.settings.fsync != "never":
                    fileio.start_writeback(fd, session.bytes_written, n)
            except ValueError:  # the spool is shorter than the file: it was cut short
                self._spool_cut_short(held)
                return False
            session.bytes_written += n
            self._publish(held)
            yield n
            if session.state != states.WRITING:
                return False
        return True

    def _adopt(self, held: Held, spool: str) -> None:
        session = held.session
        total = session.total_bytes or 0
        if not self.storage.adopt(session.id, spool):
            session.spooled = False  # this storage cannot take the file: copy it after all
            session.bytes_written = 0
            held.sha256 = None
            self._publish(held, STATE)
            self._start_drain(session.id)
            return
        session.spooled = False
        self.bytes_written.inc(total)
        self._finish(held)

    def _spool_cut_short(self, held: Held) -> None:
        held.session.state = states.WAITING
        held.session.set_error(
            "spool_incomplete", "the spooled data ends early; resume by sending the file again"
        )
        self._publish(held, STATE)

    def _append(self, msg: Append) -> Generator[int, None, None]:
        try:
            held = self._hold(msg.session_id)
            session = held.session
            if self._already_applied(session, msg):
                self._reply(msg.request_id, session)
                return
            self._check_appendable(session, msg)
        except Refused as exc:
            self._discard_segment(msg)
            self._refuse(msg.request_id, msg.session_id, exc)
            return
        if msg.declare_length is not None:
            session.total_bytes = msg.declare_length
        checksum = hashlib.new(msg.checksum[0]) if msg.checksum else None
        rollback = self._hasher(held).copy()
        start = session.bytes_written
        fd = fileio.open_for_read(msg.segment) if msg.length else -1
        try:
            done = 0
            if msg.length:
                session.state = states.WRITING
                self.live.put(session)
            while done < msg.length:
                n = min(self.settings.chunk_size, msg.length - done)
                try:
                    self._copy(held, fd, done, start + done, n, checksum)
                except OSError as exc:
                    held.sha256 = rollback
                    self._io_failure(held, exc, msg.request_id)
                    return
                done += n
                try:
                    yield n
                except Interrupted as stop:
                    self._rollback(held, start, rollback)
                    self._reply(
                        msg.request_id,
                        session,
                        status=stop.status,
                        code=stop.code,
                        message=stop.message,
                    )
                    return
            if checksum is not None and checksum.digest() != msg.checksum[1]:
                self._rollback(held, start, rollback)
                self._reply(
                    msg.request_id,
                    session,
                    status=460,
                    code="checksum_mismatch",
                    message=f"the {msg.checksum[0]} checksum of the request body does "
                    "not match Upload-Checksum; the chunk was discarded",
                )
                return
            session.bytes_written = start + msg.length
            session.error = None
            if session.total_bytes is not None and session.bytes_written >= session.total_bytes:
                self._finish(held)
            else:
                session.state = states.WAITING
                self._publish(held, COMMIT)
            self._reply(msg.request_id, session)
        finally:
            if fd >= 0:
                os.close(fd)
            self._discard_segment(msg)

    @staticmethod
    def _already_applied(session: Session, msg: Append) -> bool:
        """A request re-sent after a writer restart whose bytes were committed before it died."""
        return (
            msg.length > 0
            and msg.offset + msg.length == session.bytes_written
            and not os.path.exists(msg.segment)
        )

    def _refuse(self, request_id: int | None, session_id: str, exc: Refused | Interrupted) -> None:
        held = self.held.get(session_id)
        self._reply(
            request_id,
            held.session if held else None,
            status=exc.status,
            code=exc.code,
            message=exc.message,
        )

    def _check_appendable(self, session: Session, msg: Append) -> None:
        if session.state in (states.TERMINATED, states.EXPIRED):
            raise Refused(410, "gone", f"the upload was {session.state}")
        if session.state == states.PAUSED:
            raise Refused(423, "paused", "the upload is paused; resume it first")
        if session.state == states.COMPLETED:
            raise Refused(409, "completed", "the upload is already complete")
        if msg.offset != session.bytes_written:
            raise Refused(
                409,
                "offset_mismatch",
                f"Upload-Offset {msg.offset} does not match the upload's offset "
                f"{session.bytes_written}",
            )
        total = msg.declare_length if msg.declare_length is not None else session.total_bytes
        if total is not None and msg.offset + msg.length > total:
            raise Refused(413, "exceeds_length", "the body goes past the upload's length")

    def _rollback(self, held: Held, offset: int, hasher: Any) -> None:
        self._data(held).truncate(offset)
        held.sha256 = hasher
        held.session.state = states.WAITING

    def _discard_segment(self, msg: Append) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(msg.segment)

    def _concat(self, msg: Concat) -> Generator[int, None, None]:
        try:
            held = self._hold(msg.session_id)
        except Refused as exc:
            self._refuse(msg.request_id, msg.session_id, exc)
            return
        session = held.session
        data = self._data(held)
        data.truncate(0)
        session.bytes_written = 0
        held.sha256 = hashlib.sha256()
        session.state = states.WRITING
        for part_id in msg.parts:
            part = self.storage.open(part_id)
            try:
                size = part.size()
                for off, n in fileio.windows(0, size, self.settings.chunk_size):
                    with part.view(off, n) as view:
                        held.sha256.update(view)
                        data.write(view, session.bytes_written)
                    self.bytes_written.inc(n)
                    session.bytes_written += n
                    yield n
            except OSError as exc:
                self._io_failure(held, exc, msg.request_id)
                return
            finally:
                part.close()
        session.total_bytes = session.bytes_written
        self._finish(held)
        self._reply(msg.request_id, session)

    def _finish(self, held: Held) -> None:
        """Complete the upload: sync, check the declared digest, publish under its filename."""
        session = held.session
        digest = self._hasher(held).hexdigest()
        if self.settings.fsync != "never":
            self._data(held).sync()
        session.sha256 = digest
        if session.expected_sha256 and session.expected_sha256 != digest:
            session.state = states.FAILED
            session.set_error(
                "digest_mismatch",
                f"the file's SHA-256 is {digest}, not the "
                f"declared {session.expected_sha256}; it was discarded",
            )
            self._discard_data(held)
            self._remove_spool(session.id)
            self._publish(held, STATE)
            self._emit("failed", session)
            self._release(held)
            return
        try:
            if session.concat != "partial":
                if held.data is not None:
                    held.data.close()
                    held.data = None
                session.location = self.storage.publish(
                    session.id, session.filename, durable=self.settings.fsync != "never"
                )
        except OSError as exc:
            self._io_failure(held, exc)
            return
        session.state = states.COMPLETED
        session.error = None
        session.expires_at = None
        self._publish(held, STATE)
        self._emit("completed", session)
        self._remove_spool(session.id)
        self._release(held)

    def _discard_data(self, held: Held) -> None:
        if held.data is not None:
            held.data.close()
            held.data = None
        self.storage.discard(held.session.id)
        held.session.bytes_written = 0
        held.sha256 = None

    def _io_failure(self, held: Held, exc: OSError, request_id: int | None = None) -> None:
        """A write failed: count nothing past the durable offset and tell the client why."""
        session = held.session
        disk_full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        code = "disk_full" if disk_full else "io_error"
        message = f"writing the upload failed: {os.strerror(exc.errno) if exc.errno else exc}"
        log.error("session %s: %s", session.id, message)
        with contextlib.suppress(OSError):
            self._data(held).truncate(session.bytes_written)
        held.sha256 = None
        session.state = states.FAILED
        session.set_error(code, message)
        with contextlib.suppress(OSError):
            self._publish(held, STATE)
        self._emit("failed", session)
        self._reply(
            request_id, session, status=507 if disk_full else 500, code=code, message=message
        )

    # -- control ----------------------------------------------------------------------------

    def _read_controls(self, nudge: Nudge) -> None:
        while True:
            try:
                command: Command = nudge.queue.get_nowait()
            except Empty:
                return
            except (EOFError, OSError, BrokenPipeError):
                log.error(
                    "writer %d: control queue of %s unreachable",
                    self.settings.index,
                    nudge.session_id,
                )
                return
            try:
                held = self._hold(nudge.session_id)
                session = self._apply(held, command)
            except Refused as exc:
                self._refuse(command.request_id, nudge.session_id, exc)
            else:
                self._reply(command.request_id, session)

    def _apply(self, held: Held, command: Command) -> Session:
        session = held.session
        action = command.action
        if session.state in (states.TERMINATED, states.EXPIRED):
            raise Refused(
                410 if action != RESUME else 409, "gone", f"the upload was {session.state}"
            )
        if action == PAUSE:
            if session.state == states.COMPLETED:
                raise Refused(409, "completed", "the upload is already complete")
            self._interrupt(session.id, 423, "paused", "the upload was paused")
            session.state = states.PAUSED
            self._publish(held, STATE)
        elif action == RESUME:
            if session.state not in (states.PAUSED, states.WAITING, states.FAILED):
                raise Refused(409, "not_paused", f"the upload is {session.state}, not paused")
            if session.protocol == states.SEED:
                session.state = states.QUEUED
                self._start_drain(session.id)
            else:
                session.state = states.WAITING
            session.error = None
            self._publish(held, STATE)
        elif action in (TERMINATE, EXPIRE):
            if session.state == states.COMPLETED and not command.args.get("completed_too"):
                raise Refused(409, "completed", "the upload is already complete")
            self._interrupt(session.id, 410, "gone", f"the upload was {action}d")
            self._discard_data(held)
            self._remove_spool(session.id)
            if session.location and command.args.get("completed_too"):
                with contextlib.suppress(FileNotFoundError):
                    (self.layout.root / session.location).unlink()
            session.state = states.TERMINATED if action == TERMINATE else states.EXPIRED
            self._publish(held, STATE)
            self._emit(session.state, session)
            self._release(held)
        else:
            raise Refused(400, "bad_command", f"unknown command {action!r}")
        return session

    def _interrupt(self, session_id: str, status: int, code: str, message: str) -> None:
        """Stop every task of the session at this chunk boundary; each requester gets an answer."""
        for task in self._tasks_of(session_id):
            self._remove(task)
            if inspect.getgeneratorstate(task.steps) == inspect.GEN_CREATED:
                task.steps.close()  # never started: answer for it
                if isinstance(task.message, Append):
                    self._discard_segment(task.message)
                self._refuse(task.request_id, session_id, Interrupted(status, code, message))
                continue
            with contextlib.suppress(StopIteration, Interrupted):
                task.steps.throw(Interrupted(status, code, message))
            task.steps.close()

    def _checkpoint_all(self) -> None:
        """On shutdown: make every held session's record durable where it stands."""
        for held in list(self.held.values()):
            with contextlib.suppress(OSError):
                self._publish(held, STATE)
            if held.data is not None:
                held.data.close()


def main(
    settings: WriterSettings,
    inbox: Connection,
    replies: Connection,
    sessions_proxy: Any,
    log_level: str,
    log_format: str,
) -> None:
    """Entry point of a writer process (a top-level function, so `spawn` can import it)."""
    processes.become_child()
    logs.configure(log_level, log_format)
    layout = Layout(Path(settings.upload_dir))
    writer = Writer(
        settings,
        inbox,
        replies,
        LiveSessions(sessions_proxy),
        FileSessionStore(layout.sessions),
        LocalStorage(layout, writeback=settings.fsync != "never"),
        layout,
    )
    writer.serve()
