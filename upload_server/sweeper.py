"""The background sweep: expire abandoned uploads, let finished sessions go, remove what nothing refers
to any more.

Every `interval` seconds, in a thread of the front end:
- an incomplete upload (waiting, paused or failed: never one a writer is working on) whose
  `expires_at` has passed is expired by its writer, which removes its data and spool; its record is
  filed as finished, so its id answers 410 (tus) or 404 with `session_expired` (seed API);
- a finished session leaves the live view `--live-grace` after it ended (its record answers);
- spool and partial files with no live session behind them (left by a crash) are removed, and so are
  spool temporaries older than a minute.
Once an hour (`retire`) retention runs over the finished records: one older than `--keep-finished`
is reduced to a tombstone, and a tombstone kept as long again is removed. Unfinished and failed
sessions are never touched, nor completed files. Everything goes in steps of `BATCH` with a pause
between, so requests are not held up behind a long sweep. With several nodes every node sweeps the
shared records (Redis expires finished ones itself) and its own local files; two nodes expiring one
upload at once is harmless: its lease lets one do it, the other is told no.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

from . import errors
from .service import SessionService
from .sessions import lifecycle
from .sessions.lifecycle import Refusal
from .sessions.record import Session

log = logging.getLogger("upload_server.sweeper")

TEMP_GRACE = 60.0
BATCH = 100  # records handled between pauses
PAUSE = 0.01  # seconds: requests get the interpreter and the Manager meanwhile
RETIRE_EVERY = 3600.0  # retention is counted in days: once an hour is often enough


class Sweeper:
    def __init__(self, service: SessionService, interval: float) -> None:
        self.service = service
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)
        self.expired = 0
        self.reduced = 0
        self.removed = 0
        self._next_retire = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except Exception:  # the sweep must never die: log and try again next time
                log.exception("sweep failed")

    def sweep(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        service = self.service
        counted = service.limits.saved()
        sessions = service.all_sessions()
        service.limits.forget_ended(counted, sessions)
        due = [s for s in sessions if lifecycle.is_due_to_expire(s, now)]
        for count, session in enumerate(due, 1):
            self._expire(session)
            if count % BATCH == 0 and self._stop.wait(PAUSE):
                return
        self._evict(service.live.all(), now)
        alive = {s.id for s in sessions if not lifecycle.is_filed_as_finished(s)}
        self._remove_orphans(service.layout.spool_dir, alive, now)
        self._remove_orphans(service.layout.partial_dir, alive, now)
        if now >= self._next_retire:
            self._next_retire = now + RETIRE_EVERY
            self.retire(now)

    def _evict(self, live: list[Session], now: float) -> None:
        """Finished sessions past their grace leave the live view (one Manager call each)."""
        grace = self.service.config.live_grace
        due = [s.id for s in live if lifecycle.may_leave_live_view(s, now, grace)]
        for count, session_id in enumerate(due, 1):
            self.service.directory.evict(session_id)
            if count % BATCH == 0 and self._stop.wait(PAUSE):
                return

    def retire(self, now: float | None = None) -> None:
        """Retention: finished records past `--keep-finished` become tombstones, tombstones past
        it again are removed (the rules are `lifecycle`'s; the store lists the candidates)."""
        now = time.time() if now is None else now
        service = self.service
        keep = service.config.keep_finished
        if not keep:
            return
        durable = service.config.fsync != "never"
        for count, session_id in enumerate(service.store.finished_before(now - keep), 1):
            session = service.store.load(session_id)
            if session is not None and lifecycle.is_due_for_removal(session, now, keep):
                service.store.delete(session_id)
                service.directory.evict(session_id)
                self.removed += 1
            elif session is not None and lifecycle.is_due_for_tombstone(session, now, keep):
                service.store.save(lifecycle.reduce_to_tombstone(session, now), durable=durable)
                service.directory.evict(session_id)
                self.reduced += 1
            if count % BATCH == 0 and self._stop.wait(PAUSE):
                return

    def _expire(self, session: Session) -> None:
        try:
            self.service.control(session, "expire")
        except (errors.UploadError, Refusal) as exc:  # it moved on (resumed, completed) since we
            # looked
            log.info("not expiring %s: %s", session.id, exc.message)
            return
        self.expired += 1
        log.info("expired abandoned upload %s (%s)", session.id, session.filename)

    @staticmethod
    def _remove_orphans(directory: Path, alive: set[str], now: float) -> None:
        for path in directory.iterdir():
            session_id = path.name.split(".", 1)[0]
            if session_id in alive and not path.name.endswith(".tmp"):
                continue
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime + TEMP_GRACE < now:
                    path.unlink()
