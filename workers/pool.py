"""The pool of writer processes, as the front end sees it.

The pool starts one long-lived process per writer, pins each session to one of them, sends work and
control, and matches replies to the requests waiting for them (`PendingRequests`). Its monitor
thread (`monitor.Monitor`) watches the processes: when a writer dies or stalls it starts a
replacement at the same index, and the pool re-sends the work the dead one had not answered,
re-starts the drains of its seed sessions from their recorded offsets, and fails its unanswered
control requests so their callers can retry. No session is left looking "in progress" without a
writer behind it. A writer that does not answer (see `monitor`) gets no new requests meanwhile:
they are answered at once, so no front-end thread waits on a stopped process.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from upload_server.sessions import record as states
from upload_server.sessions import versions
from upload_server.sessions.live import LiveSessions
from upload_server.sessions.record import Session

from . import writer
from .messages import (
    Append,
    Claim,
    Command,
    Concat,
    Drain,
    Event,
    Follow,
    Locate,
    Nudge,
    Ping,
    Reply,
    Shutdown,
)
from .monitor import Monitor, WriterHandle
from .pending import PendingRequests, WriterUnavailable
from .settings import WriterSettings

__all__ = ["WriterPool", "WriterUnavailable"]

log = logging.getLogger("upload_server.pool")

FOLLOWED = 64  # bodies whose writer is remembered until their request claims them, at most
CLAIM_TIMEOUT = 120.0  # seconds a request waits for its writer to finish hashing its part


class WriterPool:
    def __init__(
        self,
        ctx: Any,
        manager: Any,
        live: LiveSessions,
        settings: WriterSettings,
        count: int,
        log_level: str = "INFO",
        log_format: str = "auto",
        stall_timeout: float = 10.0,
    ) -> None:
        self._ctx = ctx
        self._manager = manager
        self._live = live
        self._settings = settings
        self._count = count
        self._log_level = log_level
        self._log_format = log_format
        self._pending = PendingRequests()
        self._monitor = Monitor(self._spawn, self._pending, stall_timeout, self._hand_over)
        self._controls: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._round_robin = itertools.cycle(range(count))
        self._followed: dict[tuple[int, int], int] = {}  # body -> the writer following it
        self.healing = False  # the Manager is being replaced: requests are refused at once

    # -- what the monitor sees and reports (set by the runtime and the service) -------------

    @property
    def on_event(self) -> Callable[[Event], None] | None:
        return self._monitor.on_event

    @on_event.setter
    def on_event(self, handler: Callable[[Event], None] | None) -> None:
        self._monitor.on_event = handler

    @property
    def on_record(self) -> Callable[[dict[str, Any]], None] | None:
        return self._monitor.on_record

    @on_record.setter
    def on_record(self, handler: Callable[[dict[str, Any]], None] | None) -> None:
        self._monitor.on_record = handler

    @property
    def manager_sentinel(self) -> Any:
        return self._monitor.manager_sentinel

    @manager_sentinel.setter
    def manager_sentinel(self, sentinel: Any) -> None:
        self._monitor.manager_sentinel = sentinel

    @property
    def on_manager_death(self) -> Callable[[], None] | None:
        return self._monitor.on_manager_death

    @on_manager_death.setter
    def on_manager_death(self, handler: Callable[[], None] | None) -> None:
        self._monitor.on_manager_death = handler

    @property
    def restarts(self) -> int:
        return self._monitor.restarts

    @property
    def stalls(self) -> int:
        """Writers killed because they stalled."""
        return self._monitor.stalls

    @property
    def last_death(self) -> float | None:
        """time.monotonic() of the latest writer death."""
        return self._monitor.last_death

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, ready_timeout: float = 60.0) -> None:
        """Start the writers and wait until each answers, so the server never listens (nor says it
        is ready) while its writers are still importing: under `spawn` that takes seconds."""
        self._monitor.start(self._count)
        deadline = time.monotonic() + ready_timeout
        while (answered := self.ping()) < self._count:
            if time.monotonic() >= deadline:
                log.warning(
                    "%d of %d writers answer after %.0fs", answered, self._count, ready_timeout
                )
                return

    def _spawn(self, index: int) -> WriterHandle:
        inbox_recv, inbox_send = self._ctx.Pipe(duplex=False)
        replies_recv, replies_send = self._ctx.Pipe(duplex=False)
        settings = WriterSettings(**{**self._settings.__dict__, "index": index})
        vitals = self._ctx.Array("Q", writer.VITALS, lock=False)
        counters = versions.new_counters(self._ctx)
        process = self._ctx.Process(
            target=writer.main,
            args=(
                settings,
                inbox_recv,
                replies_send,
                self._live.proxy,
                self._log_level,
                self._log_format,
                vitals,
                counters,
            ),
            name=f"upload-writer-{index}",
            daemon=True,
        )
        process.start()
        inbox_recv.close()
        replies_send.close()
        return WriterHandle(index, process, inbox_send, replies_recv, vitals, counters)

    def counters(self) -> list[Any]:
        """Each writer's change counters, by index (see `sessions.versions.RecordCache`): None
        for one being replaced, none while the live view is rebuilt."""
        if self.healing:
            return []
        return [None if h.replacing else h.counters for h in self._monitor.handles]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask every writer to checkpoint and exit; kill the ones that do not in `timeout`."""
        self._monitor.closing = True
        handles = self._monitor.handles
        for handle in handles:
            with contextlib.suppress(OSError, ValueError):
                handle.send(Shutdown())
        deadline = time.monotonic() + timeout
        for handle in handles:
            handle.process.join(max(0.0, deadline - time.monotonic()))
            if handle.process.is_alive():
                log.warning("writer %d did not stop in time; killing it", handle.index)
                handle.process.kill()
                handle.process.join(2)
        self._pending.close("the server is shutting down")
        self._controls.clear()

    def restart_all(self, manager: Any) -> None:
        """Replace every writer (the Manager they were connected to was replaced): kill the old
        ones first, so none writes a record while the new view is built from the records; the
        requests waiting on them are failed (their clients retry). Call `kill_all` first,
        then rebuild the view, then this; from the monitor thread only (see `monitor`)."""
        self._manager = manager
        with self._lock:
            self._controls.clear()
        self._monitor.replace_all()
        self._pending.fail("the server is restarting its session store; try again")

    def kill_all(self) -> None:
        """SIGKILL every writer and answer every waiting request (see `restart_all`)."""
        self._monitor.kill_all()
        self._pending.fail("the server is restarting its session store; try again")

    @property
    def count(self) -> int:
        return self._count

    def alive(self) -> int:
        return sum(1 for h in self._monitor.handles if h.process.is_alive())

    def pids(self) -> list[int]:
        return [h.process.pid for h in self._monitor.handles]

    def ping(self, timeout: float = 1.0) -> int:
        """How many writers answer within `timeout` (alive and not stuck)."""
        futures = []
        for handle in self._monitor.handles:
            if handle.unresponsive or self.healing:
                continue  # a stopped writer's pipe may be full: never block on it
            request_id = self.next_request_id()
            future = self._pending.add(request_id, handle.index, None, resend=False)
            futures.append((request_id, future))
            with contextlib.suppress(OSError, ValueError):
                handle.send(Ping(request_id))
        deadline = time.monotonic() + timeout
        answered = 0
        for request_id, future in futures:
            with contextlib.suppress(FutureTimeout, WriterUnavailable):
                future.result(max(0.0, deadline - time.monotonic()))
                answered += 1
            self._pending.drop(request_id)
        return answered

    def queue_depths(self) -> list[int]:
        """Requests waiting for an answer, per writer."""
        return self._pending.depths(self._count)

    # -- requests -----------------------------------------------------------------------------

    def assign(self) -> int:
        """The writer a new session is pinned to."""
        with self._lock:
            return next(self._round_robin)

    def next_request_id(self) -> int:
        return next(self._ids)

    def drain(self, session: Session) -> None:
        """Start (or continue) copying a seed session's spool, or a tus session's counted
        segments, into its data; nothing waits for it. A writer
        being replaced gets it with the replacement (see `_hand_over`)."""
        with contextlib.suppress(OSError, ValueError):
            self._handle_for(session).send(Drain(session.id))

    def follow(self, message: Follow) -> None:
        """Have a writer hash a seed form's file part while its body arrives (`follow.py`);
        from waitress's I/O thread, so it never waits: a busy or unresponsive writer is skipped
        (the session's drain then hashes the spool itself)."""
        index = self.assign()
        handle = self._monitor.handles[index]
        if self.healing or handle.unresponsive:
            return
        with self._lock:
            self._followed[message.key] = index
            while len(self._followed) > FOLLOWED:
                self._followed.pop(next(iter(self._followed)))
        with contextlib.suppress(OSError, ValueError):
            if handle.try_send(message):
                return
        with self._lock:
            self._followed.pop(message.key, None)

    def followed(self, key: tuple[int, int]) -> int | None:
        """The writer told to follow body `key` (once): its file part's session is pinned there."""
        with self._lock:
            return self._followed.pop(key, None)

    def locate(self, key: tuple[int, int]) -> int | None:
        """Where the file part of the followed body `key` ends (its length), as its writer
        found it (`follow.py`); None when no writer can tell."""
        with self._lock:
            index = self._followed.get(key)
        if index is None:
            return None
        try:
            reply = self._request(
                index, Locate(self.next_request_id(), key), CLAIM_TIMEOUT, resend=False
            )
        except WriterUnavailable:
            return None
        return reply.length

    def claim_digest(self, session: Session, key: tuple[int, int], length: int) -> None:
        """Have the session's writer keep the digest of its spool, hashed while its body `key`
        arrived (`follow.py`); if it cannot, its drain hashes the spool as before."""
        claim = Claim(self.next_request_id(), session.id, key, length)
        with contextlib.suppress(WriterUnavailable):
            self._request(session.writer, claim, CLAIM_TIMEOUT, resend=False)

    def append(self, session: Session, message: Append, timeout: float) -> Reply:
        return self._request(session.writer, message, timeout, resend=True)

    def concat(self, session: Session, message: Concat, timeout: float) -> Reply:
        return self._request(session.writer, message, timeout, resend=True)

    def control(self, session: Session, action: str, timeout: float = 30.0, **args: Any) -> Reply:
        """Put a command on the session's control queue and wait for the writer to apply it."""
        self._check_reachable(self._handle_for(session))
        request_id = self.next_request_id()
        queue = self._control_queue(session.id)
        try:
            queue.put(Command(request_id, action, args))
        except (OSError, EOFError) as exc:
            raise WriterUnavailable(
                f"the server's session store is restarting ({type(exc).__name__}); try again"
            ) from None
        return self._request(
            session.writer, Nudge(session.id, queue), timeout, resend=False, request_id=request_id
        )

    def forget(self, session_id: str) -> None:
        """Drop a finished session's control queue."""
        with self._lock:
            self._controls.pop(session_id, None)

    def _control_queue(self, session_id: str) -> Any:
        with self._lock:
            queue = self._controls.get(session_id)
        if queue is None:
            try:
                queue = self._manager.Queue()
            except (OSError, EOFError) as exc:
                raise WriterUnavailable(
                    f"the server's session store is restarting ({type(exc).__name__}); try again"
                ) from None
            with self._lock:
                queue = self._controls.setdefault(session_id, queue)
        return queue

    def _handle_for(self, session: Session) -> WriterHandle:
        return self._handle_at(session.writer)

    def _handle_at(self, writer: int) -> WriterHandle:
        return self._monitor.handles[writer % self._count]

    def _request(
        self,
        writer: int,
        message: Any,
        timeout: float,
        *,
        resend: bool,
        request_id: int | None = None,
    ) -> Reply:
        handle = self._handle_at(writer)
        self._check_reachable(handle)
        request_id = request_id if request_id is not None else message.request_id
        future: Future = self._pending.add(request_id, handle.index, message, resend=resend)
        try:
            try:
                handle.send(message)
            except (OSError, ValueError) as exc:
                if not resend:
                    raise WriterUnavailable(
                        f"the writer is unreachable ({exc}); try again"
                    ) from None
                log.warning(
                    "writer %d unreachable; the request waits for its replacement", handle.index
                )
            return future.result(timeout)
        except FutureTimeout:
            raise WriterUnavailable("the writer did not answer in time; try again") from None
        finally:
            self._pending.drop(request_id)

    def _check_reachable(self, handle: WriterHandle) -> None:
        """Answer at once rather than wait on a writer that cannot answer (see `monitor`)."""
        if self.healing:
            raise WriterUnavailable("the server is restarting its session store; try again")
        if handle.unresponsive:
            handle.wanted = True
            raise WriterUnavailable(
                f"writer {handle.index} is not responding; it is being replaced; try again"
            )

    def _hand_over(self, index: int) -> None:
        """A replacement runs at `index`: it gets the dead writer's unanswered work, and the
        drains of its sessions that carry on by themselves; unanswered commands are failed (their
        callers retry)."""
        handle = self._monitor.handles[index]
        for request_id, pending in self._pending.of(index):
            if pending.future.done():
                continue  # failed already (while it was unresponsive): its client retries
            if pending.resend:
                handle.send(pending.message)
            else:
                self._pending.drop(request_id)
                pending.future.set_exception(
                    WriterUnavailable("the writer restarted before answering; try again")
                )
        for session in self._live.all():
            if (
                session.writer % self._count == index
                and (session.protocol == states.SEED or session.segments)
                and session.state in (states.QUEUED, states.WRITING)
            ):
                handle.send(Drain(session.id))
