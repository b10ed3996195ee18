"""The processes behind one server: the Manager, the writer pool, and start-up recovery.

`Runtime.start` takes an exclusive lock on the upload directory (two servers on one directory would
corrupt each other's uploads), starts the Manager, rebuilds the live view from the durable records,
reconciles each session with the bytes actually stored, starts the writers, and lets every seed
session whose spool survived carry on by itself. `close` stops them all and leaves no process behind.

With a shared session store (cluster mode) the records in Redis belong to every node: this node
recovers only those its session directory says are its own (written under the same `--node-id`),
and the directory joins the cluster (heartbeat, leases, control channel) once the writers run.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any

from workers.messages import Event
from workers.pool import WriterPool
from workers.writer import WriterSettings

from . import metrics, processes
from .backends import Backends
from .config import Config
from .hooks import Hooks
from .layout import Layout
from .service import SessionService
from .sessions import lifecycle, segments
from .sessions import record as states
from .sessions.directory import SessionDirectory
from .sessions.live import LiveSessions
from .sessions.record import Session
from .sessions.store import SessionStore
from .sessions.versions import RecordCache
from .storage import Storage
from .sweeper import Sweeper

log = logging.getLogger("upload_server")

LOCK_WAIT = 5.0  # long enough for a killed server's children to die with it


class DirectoryLocked(RuntimeError):
    pass


class Runtime:
    def __init__(self, config: Config, hooks: Hooks) -> None:
        self.config = config
        self.hooks = hooks
        self.layout = Layout(Path(config.upload_dir).absolute())
        self.backends = Backends.from_config(config)
        self.store: SessionStore = self.backends.open_store(self.layout)
        self.storage: Storage = self.backends.open_storage(self.layout)
        self.directory: SessionDirectory | None = None
        self.manager: SyncManager | None = None
        self.pool: WriterPool | None = None
        self.service: SessionService | None = None
        self.sweeper: Sweeper | None = None
        self._lock_fd: int | None = None
        self._on_close: list[Callable[[], None]] = []
        self._completed: list[Event] = []  # completions of recovery the front end has not seen
        self._ctx: Any = None
        self.manager_restarts = 0
        self.started = time.time()

    def start(self) -> Runtime:
        self.layout.create()
        self._lock_directory()
        ctx = multiprocessing.get_context(self.config.start_method)
        self.manager = SyncManager(ctx=ctx)
        self.manager.start(initializer=processes.become_child)
        live = LiveSessions(self.manager.dict())
        self.directory = self.backends.open_directory(self.store, live, self.config.lease_ttl)
        recovered = self._recover(live)
        settings = WriterSettings(
            index=0,
            upload_dir=str(self.layout.root),
            chunk_size=self.config.chunk_size,
            max_bytes_per_second=self.config.max_bytes_per_second,
            write_behind=self.config.write_behind,
            write_behind_total=self.config.write_behind_total // self.config.writers,
            fsync=self.config.fsync,
            expiry=self.config.expiry,
            backends=self.backends,
        )
        self.pool = WriterPool(
            ctx,
            self.manager,
            live,
            settings,
            self.config.writers,
            self.config.log_level,
            self.config.log_format,
            self.config.writer_stall_timeout,
        )
        live.cache = RecordCache(self.pool.counters)
        self._ctx = ctx
        self.pool.manager_sentinel = self.manager._process.sentinel
        self.pool.on_manager_death = self._heal
        self.pool.start()
        self.service = SessionService(
            self.config,
            self.layout,
            live,
            self.store,
            self.storage,
            self.pool,
            self.hooks,
            self.directory,
        )
        self._report_completed(self.service)  # publishes `_recover` finished
        self.directory.start(self.service.control_from_peer)
        for session in recovered:
            self.pool.drain(session)
        self.sweeper = Sweeper(
            self.service, sweep_interval(self.config.expiry, self.config.live_grace)
        )
        self.sweeper.start()
        log.info(
            "upload_server: %d writers (%s), upload dir %s, %d sessions recovered",
            self.config.writers,
            self.config.start_method,
            self.layout.root,
            len(recovered),
        )
        return self

    def on_close(self, stop: Callable[[], None]) -> None:
        """Have `close` call `stop` first (what feeds work to the writers stops before them)."""
        self._on_close.append(stop)

    def close(self) -> None:
        """Stop the writers (they checkpoint first), then the Manager. Safe to call twice."""
        while self._on_close:
            self._on_close.pop()()
        if self.sweeper is not None:
            self.sweeper.stop()
            self.sweeper = None
        self.hooks.stop()
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        if self.directory is not None:  # after the writers: no lease is let go while one writes
            self.directory.stop()
            self.directory = None
        if self.manager is not None:
            with contextlib.suppress(Exception):
                self.manager.shutdown()
            self.manager = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _heal(self) -> None:
        """The Manager died: start a new one, rebuild the live view from the durable records as
        start-up does, and restart every writer on it. Called by the pool's monitor thread, which
        lives as long as the server (the new Manager dies with that thread: PR_SET_PDEATHSIG).
        Meanwhile requests get 503 with Retry-After. A server that cannot heal exits non-zero, for
        its supervisor to restart it."""
        pool, service = self.pool, self.service
        assert pool is not None and service is not None
        began = time.monotonic()
        pool.healing = True
        try:
            pool.kill_all()  # no writer may write a record while the view is rebuilt from them
            old, self.manager = self.manager, None
            if old is not None:
                with contextlib.suppress(Exception):
                    old._process.join(1)
            manager = SyncManager(ctx=self._ctx)
            manager.start(initializer=processes.become_child)
            live = LiveSessions(manager.dict())
            recovered = self._recover(live, startup=False)
            service.live.replace(live.proxy)
            service.in_progress.recount(live.all())
            self.manager = manager
            pool.manager_sentinel = manager._process.sentinel
            pool.restart_all(manager)
        except Exception:
            log.critical("the session Manager could not be restarted; exiting", exc_info=True)
            logging.shutdown()
            os._exit(70)  # EX_SOFTWARE: a supervisor starts the server again
        finally:
            pool.healing = False
        for session in recovered:
            pool.drain(session)
        self.manager_restarts += 1
        metrics.get().manager_restarts.inc()
        log.warning(
            "the session Manager was restarted (pid %s) in %.2fs: %d sessions, %d carry on",
            manager._process.pid,
            time.monotonic() - began,
            len(live),
            len(recovered),
        )

    def _recover(self, live: LiveSessions, startup: bool = True) -> list[Session]:
        """Rebuild the live view; return the sessions that carry on by themselves: seed uploads
        from their spool, tus uploads whose records name segments (counted bytes that are still
        to be copied into the data: they are replayed, never thrown away).

        At start-up no request is in flight yet, so half-written spool files and segments that no
        record names are leftovers of a crash: their clients were never answered and will send
        them again. When the Manager is replaced (`startup` False) requests may be spooling right
        now, so nothing is deleted: the next start-up sweeps what is left."""
        directory = self.directory
        assert directory is not None
        # only what may still change (the store files finished records apart), and only this
        # node's: not other nodes' uploads
        sessions = [s for s in self.store.unfinished() if directory.owns(s)]
        named = {
            self.layout.segment(s.id, offset).name for s in sessions for offset, _ in s.segments
        }
        for leftover in [
            *self.layout.spool_dir.glob("*.seg"),
            *self.layout.spool_dir.glob("*.tmp"),
        ]:
            if startup and leftover.name not in named:
                leftover.unlink(missing_ok=True)
        resumable = []
        for session in sessions:
            session.writer %= self.config.writers
            if session.publishing and not session.is_final:
                self._finish_publish(session)
            if not session.is_final:
                self._reconcile(session)
                if session.state in (states.QUEUED, states.WRITING):
                    if session.protocol == states.SEED and (
                        self._spool_whole(session) or self._data_whole(session)
                    ):
                        resumable.append(session)
                    elif (
                        session.protocol in states.APPENDED
                        and not session.segments
                        and self._data_whole(session)
                    ):
                        # every byte is in the data, the crash came before the publishing note:
                        # its drain completes it (the client has nothing left to send)
                        resumable.append(session)
                    else:
                        lifecycle.wait_for_client(session, "the server restarted")
                        directory.share(session)
                if session.segments and session.state != states.PAUSED:
                    resumable.append(session)
            live.put(session)
        return resumable

    def _finish_publish(self, session: Session) -> None:
        """A crash came while the upload was being published: finish it (its bytes were all
        stored and hashed before the note was written) with the writer's own completion
        (`lifecycle.complete`), and tell the front end as a writer's `completed` event does
        (hooks, metrics, limits): at once when healing, at start-up once it exists."""
        durable = self.config.fsync != "never"
        try:
            location = self.storage.finish_publish(
                session.id, session.publishing, session.filename, durable=durable
            )
        except FileNotFoundError:
            log.error("upload %s: its data vanished while it was published", session.id)
            session.publishing = None
            return
        lifecycle.complete(session, location)
        self.store.save(session, durable=durable)
        log.info(
            "upload %s: finished publishing it as %s after a restart", session.id, session.location
        )
        self._completed.append(Event("completed", session.to_dict()))
        if self.service is not None:
            self._report_completed(self.service)

    def _report_completed(self, service: SessionService) -> None:
        while self._completed:
            service._on_writer_event(self._completed.pop(0))

    def _reconcile(self, session: Session) -> None:
        """The durable offset never runs ahead of what the disk holds (`segments.reconcile_stored`,
        as a writer does on first touch). (For a seed upload whose spool is to become its data,
        the spool holds the counted bytes.)"""
        if session.spooled and self._spool_whole(session):
            return
        session.spooled = False
        if segments.reconcile_stored(session, self.storage, self.layout):
            self.store.save(session, durable=True)

    def _data_whole(self, session: Session) -> bool:
        """All the file is in the upload data (a renamed spool not yet published)."""
        return (
            session.total_bytes is not None and self.storage.size(session.id) == session.total_bytes
        )

    def _spool_whole(self, session: Session) -> bool:
        try:
            return self.layout.spool(session.id).stat().st_size == session.total_bytes
        except FileNotFoundError:
            return False

    def _lock_directory(self) -> None:
        path = self.layout.internal / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + LOCK_WAIT
        while not _try_lock(fd):
            if time.monotonic() > deadline:
                os.close(fd)
                raise DirectoryLocked(
                    f"another upload_server is using {self.layout.root}; stop it or choose "
                    "another --upload-dir"
                )
            time.sleep(0.1)
        self._lock_fd = fd


def sweep_interval(expiry: float, live_grace: float = 60.0) -> float:
    """Often enough that an upload expires within about a quarter of its expiry time, and a
    finished session leaves the live view within about its grace again."""
    return max(0.5, min(60.0, expiry / 4 if expiry else 60.0, live_grace))


def _try_lock(fd: int) -> bool:
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
