"""The sessions a writer holds while it works on them, and checkpointing their records.

A writer owns the sessions pinned to it: after creation, only it changes their records. `Held` is
one of them: the record, its open data (reconciled with the record on first touch), the running
SHA-256, and `checkpoint`, the one way a record is saved. After every chunk the record is replaced
in the Manager dict (the live view); durable checkpoints follow the fsync policy. The durable
offset never runs ahead of the data: data is committed (and synced, with `fsync=always`) before
the record that counts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from upload_server import fileio, metrics
from upload_server.layout import Layout
from upload_server.sessions import segments
from upload_server.sessions.lifecycle import Refusal
from upload_server.sessions.live import LiveSessions
from upload_server.sessions.record import Session
from upload_server.sessions.store import SessionStore
from upload_server.storage import CopyingIn, ReadBack, Storage, UploadData

from .outbox import Outbox
from .policy import RecordPolicy
from .settings import WriterSettings

CHECKPOINT_INTERVAL = 1.0  # seconds between durable records while a drain runs
# seconds between live records while a drain runs: a Manager round trip costs about as much as
# hashing a 1 MiB chunk, so one per chunk doubled a seed drain's time
SHOW_INTERVAL = 0.05
PROGRESS_EVENT_INTERVAL = 1.0  # seconds between progress events of one session
# How durable a checkpoint is (see `Held.checkpoint`).
PROGRESS, COMMIT, STATE = 0, 1, 2


class Waiter(Protocol):
    """A request waiting for its answer (`append.Requester`; the context is `context.Context`)."""

    request_id: int | None

    def answer_early(self, ctx: Any, held: Held) -> None: ...


@dataclass
class Held:
    """What the writer holds for one session while it works on it."""

    owner: HeldSessions
    session: Session
    handle: UploadData | None = None
    sha256: Any = None  # hashlib object over the data, [0, data_bytes); None until needed
    applying: bool = False  # a task is copying this session's segments into its data
    # the requesters of the session's other tasks, parked while it copies: it answers them early
    # as its copying makes room (`append.Requester`)
    waiters: list[Waiter] = field(default_factory=list)
    applied: int = 0  # bytes of the first named segment already in the data (while applying)
    last_checkpoint: float = 0.0
    last_shown: float = 0.0
    last_progress_event: float = 0.0
    last_used: float = field(default_factory=time.monotonic)
    shown: dict[str, Any] | None = None  # the record this writer last put in the live view
    # The offset a client may have been told is stored: every byte counted when the session was
    # taken up (segments named by an earlier task or process count as stored), then what an
    # early answer told (`append.Requester`). A full disk never gives up segments below it.
    told: int = -1

    def __post_init__(self) -> None:
        if self.told < 0:
            self.told = self.session.bytes_written

    def data(self) -> UploadData:
        """The session's data, opened and reconciled with the record on first touch
        (`segments.reconcile_stored`): the record's offset is trusted only then. A changed count
        drops the running SHA-256; with a shared store it is saved at once, for other nodes."""
        if self.handle is None:
            owner = self.owner
            self.handle = owner.storage.open(self.session.id)
            if segments.reconcile_stored(self.session, owner.storage, owner.layout, self.handle):
                self.sha256 = None
                if owner.policy.save_reconciled:
                    self.checkpoint(STATE)
        return self.handle

    def close_data(self) -> None:
        """Let go of the data; it is reopened from what the storage holds when work resumes."""
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.close()

    def hasher(self) -> Any | None:
        """The running SHA-256. After a restart it is rebuilt by reading what was counted so far
        (from the data, or from the spool while the spool is to become the data); storage that
        cannot be read back (S3) gets None, and finishing hashes the finished file instead."""
        session = self.session
        if self.sha256 is None:
            if session.data_bytes == 0:
                self.sha256 = hashlib.sha256()
            elif session.spooled:
                fd = fileio.open_for_read(self.owner.layout.spool(session.id))
                try:
                    self.sha256 = digest_of(
                        lambda off, n: fileio.mapped(fd, off, n), session.bytes_written
                    )
                finally:
                    os.close(fd)
            else:
                data = self.data()
                if isinstance(data, ReadBack):
                    self.sha256 = digest_of(data.view, session.data_bytes)
        return self.sha256

    def copy_in(
        self, src_fd: int, src_offset: int, dst_offset: int, length: int, extra: Any = None
    ) -> int:
        """Copy one chunk from a spool file into the data, hashing it on the way (and into
        `extra`, an Upload-Checksum's hash) from the writer's buffer (`fileio.ChunkReader`):
        data that can copy in (`CopyingIn`) takes the bytes inside the kernel, other data from
        that buffer."""
        data = self.data()
        copying = isinstance(data, CopyingIn)  # once: a protocol check costs microseconds
        hasher = self.hasher()  # first: rebuilding it reads with maps, not the buffer below
        with self.owner.reader.read(src_fd, src_offset, length) as view:
            if hasher is not None:
                hasher.update(view)
            if extra is not None:
                extra.update(view)
            if not copying:
                data.write(view, dst_offset)
        if copying:
            data.write_from(src_fd, src_offset, length, dst_offset)
        self.owner.bytes_written.inc(length)
        return length

    def hash_in(self, src_fd: int, src_offset: int, length: int) -> None:
        """Hash one chunk of a file that is to become the data as it is (no copy); with fsync
        on, start its writeback now so the flush at completion finds little left to do."""
        hasher = self.hasher()
        with self.owner.reader.read(src_fd, src_offset, length) as view:
            hasher.update(view)
        if self.owner.settings.fsync != "never":
            fileio.start_writeback(src_fd, src_offset, length)

    def behind(self) -> int:
        """Counted bytes not yet in the data: the named segments, less what is copied of the
        first (the write-behind an early answer spends)."""
        return sum(length for _, length in self.session.segments) - self.applied

    def show(self) -> None:
        """Replace the live record only (a state the front end shows; nothing to make durable).
        A record the live view already holds is not sent again: a Manager round trip costs
        about a millisecond, and only this writer changes the record while it holds it (a
        Manager that died took its writers with it, so no `shown` outlives the view it names)."""
        record = self.session.to_dict()
        if record != self.shown:
            self.owner.live.put_record(self.session.id, record)
            self.shown = record

    def checkpoint(self, level: int = PROGRESS, *, live: bool = True) -> None:
        """Replace the live record, and the durable one as `level` and the fsync policy ask.

        PROGRESS: live at most every `SHOW_INTERVAL`, durable when a checkpoint is due. COMMIT:
        durable now (bytes were acknowledged). STATE: durable now and synced unless the policy is
        `never`. Under `fsync=always` data is synced before every durable record, so a record
        never counts unsynced bytes. Data is committed to its storage before the record: whole at
        COMMIT and STATE, its full parts at a PROGRESS checkpoint (a seed drain; only this node
        can continue it from its spool).
        `live=False`: a record that only a restart reads, from the store (the publishing note),
        is not put in the live view."""
        owner, session = self.owner, self.session
        session.updated_at = time.time()
        owner.policy.stamp(session)
        if not session.is_final and owner.settings.expiry:
            session.expires_at = session.updated_at + owner.settings.expiry
        fsync = owner.settings.fsync
        now = time.monotonic()
        due = now - self.last_checkpoint >= CHECKPOINT_INTERVAL
        durable = level > PROGRESS or due or fsync == "always"
        if durable:
            if self.handle is not None:
                self.handle.commit(whole=level > PROGRESS)
            if fsync == "always" and self.handle is not None:
                self.handle.sync()
            synced = fsync == "always" or (level == STATE and fsync != "never")
            owner.store.save(session, durable=synced)
            self.last_checkpoint = now
        if live and (durable or now - self.last_shown >= SHOW_INTERVAL):
            self.show()
            self.last_shown = now
        if level < STATE and now - self.last_progress_event >= PROGRESS_EVENT_INTERVAL:
            self.last_progress_event = now
            owner.outbox.emit("progress", session)

    def release(self) -> None:
        """The writer is done with this session (finished, ended, or idle in a cluster)."""
        self.owner.release(self)


class HeldSessions:
    """The sessions a writer holds, by id. `busy(session_id)`: one of its tasks has started."""

    def __init__(
        self,
        settings: WriterSettings,
        storage: Storage,
        layout: Layout,
        store: SessionStore,
        live: LiveSessions,
        policy: RecordPolicy,
        outbox: Outbox,
        busy: Callable[[str], bool],
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.layout = layout
        self.store = store
        self.live = live
        self.policy = policy
        self.outbox = outbox
        self.bytes_written = metrics.get().bytes_written
        self.reader = fileio.ChunkReader()  # this writer's one buffer for the chunks it reads
        self._busy = busy
        self._held: dict[str, Held] = {}
        self._idle_checked = 0.0

    def get(self, session_id: str) -> Held | None:
        return self._held.get(session_id)

    def hold(self, session_id: str) -> Held:
        """The session as this writer knows it. Unless one of its tasks is under way here (then
        this writer's record is the newest), the policy says whether the held record is still
        current (`RecordPolicy.load`); if it moved on, the held record, data handle and running
        SHA-256 are dropped."""
        held = self._held.get(session_id)
        if held is not None and self._busy(session_id):
            held.last_used = time.monotonic()
            return held
        session = self.policy.load(session_id, held.session if held is not None else None)
        if held is not None:
            if session is held.session:
                held.last_used = time.monotonic()
                return held
            self.release(held)
        if session is None:
            raise Refusal("not_found", f"no session {session_id}")
        held = Held(self, session)
        self._held[session_id] = held
        return held

    def behind(self) -> int:
        """Counted bytes of all held sessions not yet in their data."""
        return sum(held.behind() for held in self._held.values())

    def release(self, held: Held) -> None:
        held.close_data()
        self._held.pop(held.session.id, None)

    def release_due(self) -> float | None:
        """Seconds until idle sessions may be let go (`RecordPolicy.idle_release`), or None."""
        return self.policy.idle_release if self._held else None

    def release_idle(self, in_use: Callable[[str], bool]) -> None:
        """Let go of the sessions untouched for `idle_release` that no task needs."""
        limit = self.policy.idle_release
        now = time.monotonic()
        if limit is None or now - self._idle_checked < limit / 4:
            return
        self._idle_checked = now
        for held in list(self._held.values()):
            if now - held.last_used > limit and not in_use(held.session.id):
                self.release(held)

    def checkpoint_all(self) -> None:
        """On shutdown: make every held session's record durable where it stands."""
        for held in list(self._held.values()):
            with contextlib.suppress(OSError):
                held.checkpoint(STATE)
            held.close_data()


def digest_of(view: Callable[[int, int], AbstractContextManager[memoryview]], length: int) -> Any:
    """The SHA-256 of bytes [0, length) read through `view`, one window at a time."""
    digest = hashlib.sha256()
    for off, n in fileio.windows(0, length):
        with view(off, n) as window:
            digest.update(window)
    return digest
