"""A writer process: moves spooled bytes into upload data, one chunk at a time.

A writer owns the sessions pinned to it: after creation, only it changes their records. It keeps a
round-robin list of tasks (a seed drain, a tus append, a concatenation), each a generator that copies
one chunk per step, so a long upload never starts the others on the same writer, and between chunks it
reads its inbox, where a `Nudge` points it at a session's control queue. Each chunk is hashed (the
whole file's SHA-256, plus a tus Upload-Checksum) from an mmap window of the spool, and written from
that same window: no Python copy of the bytes. A seed upload whose spool holds the whole file is only
hashed, then renamed into the data: no second write at all.

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
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from queue import Empty
from typing import Any

from upload_server import fileio, logs, metrics, processes
from upload_server.backends import Backends
from upload_server.layout import Layout
from upload_server.sessions import lifecycle, segments
from upload_server.sessions import record as states
from upload_server.sessions.lifecycle import Refusal
from upload_server.sessions.live import LiveSessions, LiveViewLost
from upload_server.sessions.record import Session
from upload_server.sessions.store import SessionStore
from upload_server.storage import Adopting, CommittedData, ReadBack, Storage, UploadData

from .messages import (
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
# Cluster mode: an upload untouched this long is let go (record, data handle and its local buffer),
# since its next request may well go to another node; without this, every upload that ever passed
# through a node would keep a buffer file there.
IDLE_RELEASE = 30.0
PROGRESS_EVENT_INTERVAL = 1.0  # seconds between progress events of one session
PROGRESS, COMMIT, STATE = 0, 1, 2
# The writer's vital signs, a small shared array the pool's monitor reads (`WriterPool`): a heartbeat
# counted by a thread of its own, the main loop's turns (progress, a rate limit's sleeps included),
# the tasks it holds and the messages it has taken from its inbox. ABANDONED is written by the pool:
# the messages sent up to it whose requesters were answered 503 while this writer did not answer;
# if it runs again, it skips the appends among them that it had not taken yet (their clients retry,
# and may already have spooled a new body under the same segment name).
BEAT, STEPS, TASKS, RECEIVED, ABANDONED = range(5)
VITALS = 5
HEARTBEAT_INTERVAL = 0.1  # seconds
MAX_SLEEP = 0.5  # the loop turns at least this often while it holds work (a rate limit's sleep)


class Interrupted(Refusal):
    """Thrown into a task when a command stops it; its code and message are what its requester
    is told."""


@dataclass
class Held:
    """What the writer holds for one session while it works on it."""

    session: Session
    data: UploadData | None = None
    sha256: Any = None  # hashlib object over the data, [0, data_bytes); None until needed
    applying: bool = False  # a task is copying this session's segments into its data
    last_checkpoint: float = 0.0
    last_progress_event: float = 0.0
    last_used: float = field(default_factory=time.monotonic)


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
    backends: Backends


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
        vitals: Any = None,
    ) -> None:
        self.settings = settings
        self.vitals = vitals if vitals is not None else [0] * VITALS
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
        self.node_id = settings.backends.node_id
        self.shared = settings.backends.shared
        self.idle_checked = 0.0

    # -- the loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        try:
            self._serve()
        except LiveViewLost as exc:
            # The Manager is gone: nothing this writer does can be published. Its records on disk
            # are consistent (data is written before the record that counts it), so stop here;
            # the front end restarts every writer once a new Manager is up.
            log.error("writer %d: the live view is gone (%s); exiting", self.settings.index, exc)
            os._exit(3)

    def _serve(self) -> None:
        vitals = self.vitals
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
                if self.shared:
                    self._release_idle()
            vitals[STEPS] += 1
            vitals[TASKS] = len(self.tasks)
        self._checkpoint_all()

    def _idle_timeout(self) -> float | None:
        timeout = None
        if self.tasks:
            due = min(t.next_time for t in self.tasks) - time.monotonic()
            timeout = min(MAX_SLEEP, max(0.0, due))
        if self.shared and self.held:
            timeout = IDLE_RELEASE if timeout is None else min(timeout, IDLE_RELEASE)
        return timeout

    def _release_idle(self) -> None:
        now = time.monotonic()
        if now - self.idle_checked < IDLE_RELEASE / 4:
            return
        self.idle_checked = now
        for held in list(self.held.values()):
            if now - held.last_used > IDLE_RELEASE and not self._tasks_of(held.session.id):
                self._release(held)

    def _receive_all(self) -> None:
        while self.inbox.poll(0):
            message = self.inbox.recv()
            self.vitals[RECEIVED] += 1
            if isinstance(message, Append | Concat) and (
                self.vitals[RECEIVED] <= self.vitals[ABANDONED]
            ):
                log.warning(
                    "writer %d: skipping request %d for %s, answered 503 while this writer was "
                    "stopped",
                    self.settings.index,
                    message.request_id,
                    message.session_id,
                )
                continue
            self._handle(message)
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
            except LiveViewLost:
                raise
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
        self._reply(task.request_id, held.session if held else None, code=code, message=message)

    # -- sessions -------------------------------------------------------------------------

    def _hold(self, session_id: str) -> Held:
        """The session as this writer knows it, reconciled with its data on first touch.

        With a shared store (several nodes), another node may have written the upload since this
        writer last held it: unless one of its tasks is under way here, the shared record is read
        and, if it moved on, the cached record, data handle and running SHA-256 are dropped."""
        held = self.held.get(session_id)
        if self.shared and not self._busy(session_id):
            stored = self.store.load(session_id)
            if stored is None:
                if held is not None:
                    self._release(held)
                raise Refusal("not_found", f"no session {session_id}")
            if held is not None and not _moved_on(held.session, stored):
                held.last_used = time.monotonic()
                return held
            if held is not None:
                self._release(held)
            if stored.state in (states.QUEUED, states.WRITING) and stored.node != self.node_id:
                stored.wait_for_client("the node that was writing it stopped")
            held = None
            session: Session | None = stored
        elif held is not None:
            held.last_used = time.monotonic()
            return held
        else:
            session = self.live.get(session_id) or self.store.load(session_id)
        if session is None:
            raise Refusal("not_found", f"no session {session_id}")
        held = Held(session)
        self.held[session_id] = held
        return held

    def _busy(self, session_id: str) -> bool:
        """A task of this session has started here (this writer's record is the newest)."""
        return any(
            inspect.getgeneratorstate(t.steps) == inspect.GEN_SUSPENDED
            for t in self._tasks_of(session_id)
        )

    def _data(self, held: Held) -> UploadData:
        """Open the session's data and reconcile it with the record (see `_reconcile`)."""
        if held.data is None:
            held.data = self.storage.open(held.session.id)
            self._reconcile(held, held.data)
        return held.data

    def _reconcile(self, held: Held, data: UploadData) -> None:
        """Count what the disk holds (`segments.reconcile`): bytes past the counted data were
        never acknowledged, or are copies of a named segment that is copied again, so they are
        cut, unless the storage committed them (S3: an append whose record was lost), which makes
        them the offset. With a shared store a changed offset is saved at once, for other nodes."""
        session = held.session
        before = (session.bytes_written, len(session.segments))
        size = data.size()
        cut_to = segments.reconcile(
            session, size, lambda offset: self.layout.segment_size(session.id, offset)
        )
        if size > cut_to:
            try:
                data.truncate(cut_to)
            except CommittedData:
                log.warning(
                    "session %s: storage holds %d committed bytes, record says %d; keeping them",
                    session.id,
                    size,
                    session.bytes_written,
                )
                session.bytes_written = size
                session.segments = []
        if (session.bytes_written, len(session.segments)) != before:
            held.sha256 = None
            if self.shared:
                self._publish(held, STATE)

    def _hasher(self, held: Held) -> Any | None:
        """The running SHA-256. After a restart it is rebuilt by reading what was counted so far
        (from the data, or from the spool while the spool is to become the data); storage that
        cannot be read back (S3) gets None, and `_finish` hashes the finished file instead."""
        session = held.session
        if held.sha256 is None:
            if session.data_bytes == 0:
                held.sha256 = hashlib.sha256()
            elif session.spooled:
                fd = fileio.open_for_read(self.layout.spool(session.id))
                try:
                    held.sha256 = _digest(
                        lambda off, n: fileio.mapped(fd, off, n), session.bytes_written
                    )
                finally:
                    os.close(fd)
            else:
                data = self._data(held)
                if isinstance(data, ReadBack):
                    held.sha256 = _digest(data.view, session.data_bytes)
        return held.sha256

    def _publish(self, held: Held, level: int = PROGRESS) -> None:
        """Replace the live record, and the durable one as `level` and the fsync policy ask.

        PROGRESS: durable when a checkpoint is due. COMMIT: durable now (bytes were acknowledged).
        STATE: durable now and synced unless the policy is `never`. Under `fsync=always` data is
        synced before every durable record, so a record never counts unsynced bytes. Data is
        committed to its storage before the record: whole at COMMIT and STATE, its full parts at
        a PROGRESS checkpoint (a seed drain; only this node can continue it from its spool)."""
        session = held.session
        session.updated_at = time.time()
        if self.shared:
            session.node = self.node_id
        if not session.is_final and self.settings.expiry:
            session.expires_at = session.updated_at + self.settings.expiry
        policy = self.settings.fsync
        now = time.monotonic()
        due = now - held.last_checkpoint >= CHECKPOINT_INTERVAL
        if level > PROGRESS or due or policy == "always":
            if held.data is not None:
                held.data.commit(whole=level > PROGRESS)
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
            hasher = self._hasher(held)
            if hasher is not None:
                hasher.update(view)
            if extra is not None:
                extra.update(view)
            self._data(held).write(view, dst_offset)
        self.bytes_written.inc(length)
        return length

    def _drain(self, session_id: str) -> Generator[int, None, None]:
        """Carry a session on by itself: a seed upload from its spool, a tus upload's segments."""
        try:
            held = self._hold(session_id)
        except Refusal:
            return
        session = held.session
        if session.state not in (states.QUEUED, states.WRITING, states.FAILED, states.WAITING):
            return
        if session.protocol == states.TUS:  # segments counted before a crash or a pause
            self._data(held)
            if (yield from self._apply_segments(held, None)):
                self._settle(held, None)
            return
        spool = self.layout.spool(session_id)
        try:
            fd = fileio.open_for_read(spool)
        except FileNotFoundError:
            if (
                session.total_bytes is not None
                and self.storage.size(session_id) == session.total_bytes
            ):
                # the whole spool was renamed into the data just before a crash: finish from it
                self._unspool(held, session.total_bytes)
                self._finish(held)
                return
            self._spool_missing(held)
            return
        try:
            session.state = states.WRITING
            session.error = None
            if isinstance(self.storage, Adopting) and (
                session.spooled
                or (session.bytes_written == 0 and not self.storage.size(session_id))
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
        assert isinstance(self.storage, Adopting)
        session = held.session
        total = session.total_bytes or 0
        try:
            adopted = self.storage.adopt(session.id, spool)
        except FileNotFoundError:  # the spool was removed under us (by hand, or a cleaner)
            self._unspool(held, 0)
            self._spool_missing(held)
            return
        except OSError as exc:
            self._io_failure(held, exc)
            return
        if not adopted:
            self._unspool(held, 0)  # this storage cannot take the file: copy it after all
            self._publish(held, STATE)
            self._start_drain(session.id)
            return
        session.spooled = False
        self.bytes_written.inc(total)
        self._finish(held)

    @staticmethod
    def _unspool(held: Held, bytes_written: int) -> None:
        """The spool is no longer this upload's data: count what the storage holds, and drop the
        running digest (it no longer describes those bytes)."""
        held.session.spooled = False
        held.session.bytes_written = bytes_written
        held.sha256 = None

    def _spool_missing(self, held: Held) -> None:
        held.session.state = states.WAITING
        held.session.set_error(
            "spool_missing",
            "the server no longer holds this upload's data; resume it by sending the file again",
        )
        self._publish(held, STATE)

    def _spool_cut_short(self, held: Held) -> None:
        held.session.state = states.WAITING
        held.session.set_error(
            "spool_incomplete", "the spooled data ends early; resume by sending the file again"
        )
        self._publish(held, STATE)

    def _append(self, msg: Append) -> Generator[int, None, None]:
        """Store one request body. A plain body is first named in the record as a segment (from
        then on it counts, and survives a crash), then copied into the data; a body with an
        Upload-Checksum is copied while its checksum is computed and counts only if it matches."""
        try:
            held = self._hold(msg.session_id)
            session = held.session
            if self._already_applied(session, msg):
                self._reply(msg.request_id, session)
                return
            recorded = [msg.offset, msg.length] in session.segments
            if not recorded:
                self._check_appendable(held, msg)
        except Refusal as exc:
            self._discard_segment(msg)
            self._refuse(msg.request_id, msg.session_id, exc)
            return
        if msg.length and msg.checksum is None and not self.shared:
            if not recorded and not self._record_segment(held, msg):
                return
            if (yield from self._apply_segments(held, msg.request_id)) and self._settle(
                held, msg.request_id
            ):
                self._reply(msg.request_id, session)
            return
        if session.segments and not (yield from self._apply_segments(held, msg.request_id)):
            self._discard_segment(msg)
            return
        yield from self._append_checked(held, msg)

    def _append_checked(self, held: Held, msg: Append) -> Generator[int, None, None]:
        """Copy a body into the data while computing its Upload-Checksum; a mismatch (or a
        pause, which needs all of it) takes its bytes back out."""
        session = held.session
        length_before = session.total_bytes
        if msg.declare_length is not None:
            session.total_bytes = msg.declare_length
        checksum = hashlib.new(msg.checksum[0]) if msg.checksum else None
        hasher = self._hasher(held)
        rollback = hasher.copy() if hasher is not None else None
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
                    whole = session.total_bytes is not None and start + done >= session.total_bytes
                    if checksum is None and stop.code == "paused" and not whole:
                        # Keep what is stored (tus: a server SHOULD): the client goes on from here.
                        session.bytes_written = start + done
                        if not self._settle(held, msg.request_id, start, rollback):
                            return
                    else:
                        self._rollback(held, start, rollback, length_before)
                    self._refuse(msg.request_id, session.id, stop)
                    return
            if checksum is not None and checksum.digest() != msg.checksum[1]:
                self._rollback(held, start, rollback, length_before)
                self._reply(
                    msg.request_id,
                    session,
                    code="checksum_mismatch",
                    message=f"the {msg.checksum[0]} checksum of the request body does "
                    "not match Upload-Checksum; the chunk was discarded",
                )
                return
            session.bytes_written = start + msg.length
            if self._settle(held, msg.request_id, start, rollback):
                self._reply(msg.request_id, session)
        finally:
            if fd >= 0:
                os.close(fd)
            self._discard_segment(msg)

    def _record_segment(self, held: Held, msg: Append) -> bool:
        """Name the body's segment in the record and count it: durable per the fsync policy (the
        front end synced the segment itself under `always`). False when the record could not be
        written; the requester has been told."""
        session = held.session
        length_before = session.total_bytes
        if msg.declare_length is not None:
            session.total_bytes = msg.declare_length
        session.segments.append([msg.offset, msg.length])
        session.bytes_written = msg.offset + msg.length
        session.state = states.WRITING
        session.error = None
        try:
            self._publish(held, COMMIT)
        except OSError as exc:
            session.segments.pop()
            session.bytes_written = msg.offset
            session.total_bytes = length_before
            self._discard_segment(msg)
            self._io_failure(held, exc, msg.request_id)
            return False
        return True

    def _apply_segments(self, held: Held, request_id: int | None) -> Generator[int, None, bool]:
        """Copy every segment the record names into the data, in order, hashing on the way, and
        delete each file once its bytes are in the data. Only one task of a session copies at a
        time; another waits and finds the work done. Stopped by a command (pause, terminate),
        the data goes back to where the unfinished segment starts: the segment stays named, and
        counted, and is copied again on resume. False when stopped; the requester has been told."""
        session = held.session
        try:
            while held.applying:
                yield 0
        except Interrupted as stop:
            self._refuse(request_id, session.id, stop)
            return False
        held.applying = True
        try:
            while session.segments:
                offset, length = session.segments[0]
                if not (yield from self._apply_segment(held, offset, length, request_id)):
                    return False
                session.segments.pop(0)
            return True
        finally:
            held.applying = False

    def _apply_segment(
        self, held: Held, offset: int, length: int, request_id: int | None
    ) -> Generator[int, None, bool]:
        session = held.session
        path = self.layout.segment(session.id, offset)
        hasher = self._hasher(held)
        rollback = hasher.copy() if hasher is not None else None
        try:
            fd = fileio.open_for_read(path)
        except FileNotFoundError:
            fd = -1
        try:
            session.state = states.WRITING
            self.live.put(session)
            done = 0
            while done < length:
                n = min(self.settings.chunk_size, length - done)
                try:
                    if fd < 0:
                        raise ValueError("segment missing")
                    self._copy(held, fd, done, offset + done, n)
                except (OSError, ValueError) as exc:
                    held.sha256 = rollback
                    self._io_failure(held, _as_os_error(exc, path), request_id)
                    return False
                done += n
                try:
                    yield n
                except Interrupted as stop:
                    self._data(held).truncate(offset)
                    held.sha256 = rollback
                    self._refuse(request_id, session.id, stop)
                    return False
            if self.settings.fsync == "always":
                self._data(held).sync()
        finally:
            if fd >= 0:
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return True

    def _settle(
        self, held: Held, request_id: int | None, start: int | None = None, hasher: Any = None
    ) -> bool:
        """After an append: complete the upload if that was its last byte, else commit the record
        (a record that cannot be written counts none of the append: back to `start`)."""
        session = held.session
        if session.state == states.COMPLETED:
            return True  # another task of the session got there first
        session.error = None
        if session.total_bytes is not None and session.bytes_written >= session.total_bytes:
            return self._finish(held, request_id)
        session.state = states.WAITING
        try:
            self._publish(held, COMMIT)
        except OSError as exc:
            if start is not None:
                session.bytes_written = start
                held.sha256 = hasher
            self._io_failure(held, exc, request_id)
            return False
        return True

    @staticmethod
    def _already_applied(session: Session, msg: Append) -> bool:
        """A request re-sent after a writer restart whose bytes were committed before it died."""
        return (
            msg.length > 0
            and msg.offset + msg.length == session.bytes_written
            and [msg.offset, msg.length] not in session.segments
            and not os.path.exists(msg.segment)
        )

    def _refuse(self, request_id: int | None, session_id: str, exc: Refusal) -> None:
        held = self.held.get(session_id)
        self._reply(
            request_id,
            held.session if held else None,
            code=exc.code,
            message=exc.message,
        )

    def _check_appendable(self, held: Held, msg: Append) -> None:
        """The session rules (`lifecycle.check_append`) against the record as this writer holds
        it, reconciled with the data first: the record's offset is trusted only then."""
        session = held.session
        lifecycle.check_writable(session)
        try:
            self._data(held)
        except OSError as exc:
            raise Refusal(
                "storage_unavailable", f"the upload's storage failed: {exc}; try again"
            ) from None
        lifecycle.check_append(session, msg.offset, msg.length, declared=msg.declare_length)

    def _rollback(self, held: Held, offset: int, hasher: Any, total_bytes: int | None) -> None:
        """Undo a refused append: its bytes, its part of the digest, and a length it declared."""
        self._data(held).truncate(offset)
        held.sha256 = hasher
        held.session.total_bytes = total_bytes
        held.session.state = states.WAITING
        self.live.put(held.session)

    def _discard_segment(self, msg: Append) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(msg.segment)

    def _concat(self, msg: Concat) -> Generator[int, None, None]:
        try:
            held = self._hold(msg.session_id)
        except Refusal as exc:
            self._refuse(msg.request_id, msg.session_id, exc)
            return
        session = held.session
        data = self._data(held)
        data.truncate(0)
        session.bytes_written = 0
        held.sha256 = hashlib.sha256()
        session.state = states.WRITING
        for part_id in msg.parts:
            try:
                handle, size = self.storage.open_published(None, part_id)
            except OSError as exc:
                self._io_failure(held, exc, msg.request_id)
                return
            try:
                with handle:
                    for _, n in fileio.windows(0, size, self.settings.chunk_size):
                        block = handle.read(n)
                        if len(block) != n:
                            raise OSError(errno.EIO, f"partial upload {part_id} ended early")
                        held.sha256.update(block)
                        data.write(memoryview(block), session.bytes_written)
                        self.bytes_written.inc(n)
                        session.bytes_written += n
                        yield n
            except OSError as exc:
                self._io_failure(held, exc, msg.request_id)
                return
        session.total_bytes = session.bytes_written
        if self._finish(held, msg.request_id):
            self._reply(msg.request_id, session)

    def _finish(self, held: Held, request_id: int | None = None) -> bool:
        """Complete the upload: commit and sync, check the declared digest, publish it. False
        when that failed; the requester, if any, has then been told why.

        Without a running SHA-256 (storage that cannot be read back, once the upload moved between
        nodes or its writer restarted) the digest comes from streaming the published file once:
        the price of not being able to read an unfinished S3 multipart upload. A partial upload
        (concatenation) is published only where that is the only way to read it back."""
        session = held.session
        hasher = self._hasher(held)
        data = self._data(held)
        try:
            data.commit(whole=True)
            if self.settings.fsync != "never":
                data.sync()
        except OSError as exc:
            self._io_failure(held, exc, request_id)
            return False
        if hasher is not None and not self._digest_ok(held, hasher.hexdigest(), request_id):
            return False
        try:
            if session.concat != "partial" or not isinstance(data, ReadBack):
                data.close()
                held.data = None
                session.location = self.storage.publish(
                    session.id,
                    session.filename,
                    durable=self.settings.fsync != "never",
                    note=lambda location: self._note_publishing(held, location),
                )
            digest = hasher.hexdigest() if hasher is not None else self._published_digest(session)
        except OSError as exc:
            self._io_failure(held, exc, request_id)
            return False
        if hasher is None and not self._digest_ok(held, digest, request_id):
            return False
        session.state = states.COMPLETED
        session.publishing = None
        session.error = None
        session.expires_at = None
        self._publish(held, STATE)
        self._emit("completed", session)
        self._remove_spool(session.id)
        self._release(held)
        return True

    def _note_publishing(self, held: Held, location: str) -> None:
        """Write down, durably, where the data is about to appear: a crash from here on is
        finished at restart (`Runtime._recover`), not mistaken for lost data."""
        held.session.publishing = location
        held.session.spooled = False
        self._publish(held, STATE)

    def _published_digest(self, session: Session) -> str:
        handle, _ = self.storage.open_published(session.location, session.id)
        digest = hashlib.sha256()
        with handle:
            for block in iter(lambda: handle.read(fileio.WINDOW), b""):
                digest.update(block)
        return digest.hexdigest()

    def _digest_ok(self, held: Held, digest: str, request_id: int | None) -> bool:
        """Record the digest; a file that does not match the declared one is failed and removed."""
        session = held.session
        session.sha256 = digest
        if not session.expected_sha256 or session.expected_sha256 == digest:
            return True
        session.state = states.FAILED
        session.set_error(
            "digest_mismatch",
            f"the file's SHA-256 is {digest}, not the "
            f"declared {session.expected_sha256}; it was discarded",
        )
        if session.location:
            self.storage.remove(session.location)
            session.location = None
        self._discard_data(held)
        self._remove_spool(session.id)
        self._publish(held, STATE)
        self._emit("failed", session)
        self._release(held)
        self._reply(request_id, session, **session.error)
        return False

    def _discard_data(self, held: Held) -> None:
        if held.data is not None:
            held.data.close()
            held.data = None
        self.storage.discard(held.session.id)
        self._uncount_segments(held)
        held.session.bytes_written = 0
        held.sha256 = None

    def _uncount_segments(self, held: Held) -> None:
        """Count only what is in the data: the named segments are given up (a failed write;
        the client is told, and sends those bytes again)."""
        session = held.session
        if not session.segments:
            return
        for offset, _ in session.segments:
            with contextlib.suppress(FileNotFoundError):
                self.layout.segment(session.id, offset).unlink()
        session.bytes_written = session.data_bytes
        session.segments = []

    def _io_failure(self, held: Held, exc: OSError, request_id: int | None = None) -> None:
        """A write failed: count nothing past the durable offset and tell the client why."""
        session = held.session
        disk_full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        code = "disk_full" if disk_full else "io_error"
        message = f"writing the upload failed: {os.strerror(exc.errno) if exc.errno else exc}"
        log.error("session %s: %s", session.id, message)
        with contextlib.suppress(OSError):
            self._data(held).truncate(session.data_bytes)
        self._uncount_segments(held)
        if held.data is not None:  # reopened from what the storage holds when work resumes
            with contextlib.suppress(OSError):
                held.data.close()
            held.data = None
        held.sha256 = None
        session.state = states.FAILED
        session.set_error(code, message)
        with contextlib.suppress(OSError):
            self._publish(held, STATE)
        self._emit("failed", session)
        self._reply(request_id, session, code=code, message=message)

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
            except Refusal as exc:
                self._refuse(command.request_id, nudge.session_id, exc)
            else:
                self._reply(command.request_id, session)

    def _apply(self, held: Held, command: Command) -> Session:
        """Carry out a control command, if the session rules allow it now."""
        session = held.session
        action = command.action
        completed_too = bool(command.args.get("completed_too"))
        lifecycle.check_command(session, action, completed_too=completed_too)
        if action == lifecycle.PAUSE:
            self._interrupt(session.id, lifecycle.PAUSED, "the upload was paused")
            lifecycle.pause(session)
            self._publish(held, STATE)
        elif action == lifecycle.RESUME:
            if lifecycle.resume(session):
                self._start_drain(session.id)
            self._publish(held, STATE)
        else:
            ended = lifecycle.ENDED_BY[action]
            self._interrupt(session.id, ended, f"the upload was {ended}")
            lifecycle.end(session, action)
            self._discard_data(held)
            self._remove_spool(session.id)
            if session.location and completed_too:
                self.storage.remove(session.location)
            self._publish(held, STATE)
            self._emit(session.state, session)
            self._release(held)
        return session

    def _interrupt(self, session_id: str, code: str, message: str) -> None:
        """Stop every task of the session at this chunk boundary; each requester gets an answer."""
        for task in self._tasks_of(session_id):
            self._remove(task)
            if inspect.getgeneratorstate(task.steps) == inspect.GEN_CREATED:
                task.steps.close()  # never started: answer for it
                if isinstance(task.message, Append):
                    self._discard_segment(task.message)
                self._refuse(task.request_id, session_id, Interrupted(code, message))
                continue
            with contextlib.suppress(StopIteration, Interrupted):
                task.steps.throw(Interrupted(code, message))
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
    vitals: Any = None,
) -> None:
    """Entry point of a writer process (a top-level function, so `spawn` can import it)."""
    processes.become_child()
    if vitals is not None:
        threading.Thread(target=_heartbeat, args=(vitals,), name="heartbeat", daemon=True).start()
    logs.configure(log_level, log_format)
    layout = Layout(Path(settings.upload_dir))
    writer = Writer(
        settings,
        inbox,
        replies,
        LiveSessions(sessions_proxy),
        settings.backends.open_store(layout),
        settings.backends.open_storage(layout, writeback=settings.fsync != "never"),
        layout,
        vitals,
    )
    writer.serve()


def _heartbeat(vitals: Any) -> None:
    """Count, from a thread of its own, that this process runs: a stopped (SIGSTOP) or frozen
    writer stops counting; one that is only busy (a long write, a rate limit's sleep) does not."""
    while True:
        vitals[BEAT] += 1
        time.sleep(HEARTBEAT_INTERVAL)


def _moved_on(held: Session, stored: Session) -> bool:
    """The shared record was written by someone else since this writer last saved it."""
    mine = (held.updated_at, held.bytes_written, held.state, held.node)
    return (stored.updated_at, stored.bytes_written, stored.state, stored.node) != mine


def _digest(view: Callable[[int, int], AbstractContextManager[memoryview]], length: int) -> Any:
    """The SHA-256 of bytes [0, length) read through `view`, one window at a time."""
    digest = hashlib.sha256()
    for off, n in fileio.windows(0, length):
        with view(off, n) as window:
            digest.update(window)
    return digest


def _as_os_error(exc: OSError | ValueError, path: Path) -> OSError:
    """A segment that is gone or shorter than recorded is an I/O error of the upload's storage."""
    if isinstance(exc, OSError):
        return exc
    return OSError(errno.EIO, f"the spool segment {path.name} is missing or short")
