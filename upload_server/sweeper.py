"""The background sweep: expire abandoned uploads and remove what nothing refers to any more.

Every `interval` seconds, in a thread of the front end:
- an incomplete upload (waiting, paused or failed: never one a writer is working on) whose
  `expires_at` has passed is expired by its writer, which removes its data and spool; its durable
  record is then deleted, and a tombstone stays in the live view so its id answers 410 (tus) or 404
  with `session_expired` (seed API) until a restart;
- tombstones of terminated and expired sessions are dropped after a day (or the expiry, if longer);
- spool and partial files with no live session behind them (left by a crash) are removed, and so are
  spool temporaries older than a minute.
Completed files are never touched. With several nodes every node sweeps the shared records (the
record in Redis is the tombstone there, removed after the same retention) and its own local files;
two nodes expiring one upload at once is harmless: its lease lets one do it, the other is told no.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

from . import errors
from .service import SessionService
from .sessions import record as states
from .sessions.lifecycle import Refusal

log = logging.getLogger("upload_server.sweeper")

EXPIRABLE = (states.WAITING, states.PAUSED, states.FAILED)
TEMP_GRACE = 60.0
TOMBSTONE_DAYS = 1.0  # how long an ended session's id keeps answering 410 rather than 404


class Sweeper:
    def __init__(self, service: SessionService, interval: float) -> None:
        self.service = service
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)
        self.expired = 0

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
        retention = max(service.config.expiry, TOMBSTONE_DAYS * 86400)
        sessions = service.all_sessions()
        service.limits.forget_ended(sessions)
        for session in sessions:
            if session.state in EXPIRABLE and session.expires_at and session.expires_at < now:
                self._expire(session)
            elif (
                session.state in (states.TERMINATED, states.EXPIRED)
                and session.updated_at + retention < now
            ):
                service.live.remove(session.id)
                service.store.delete(session.id)
        alive = {s.id for s in sessions if not s.is_final or s.concat == "partial"}
        self._remove_orphans(service.layout.spool_dir, alive, now)
        self._remove_orphans(service.layout.partial_dir, alive, now)

    def _expire(self, session) -> None:
        try:
            self.service.control(session, "expire")
        except (errors.UploadError, Refusal) as exc:  # it moved on (resumed, completed) since we
            # looked
            log.info("not expiring %s: %s", session.id, exc.message)
            return
        self.service.directory.expired(session.id)
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
