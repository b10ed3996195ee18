"""The pool of writer processes, as the front end sees it.

The pool starts one long-lived process per writer, pins each session to one of them, sends work and
control, and matches replies to the requests waiting for them. A monitor thread watches every
writer's reply pipe and process sentinel: when a writer dies (killed, out of memory) it starts a
replacement at the same index, re-sends the work the dead one had not answered, re-starts the drains
of its seed sessions from their recorded offsets, and fails its unanswered control requests so their
callers can retry. No session is left looking "in progress" without a writer behind it.

The monitor also watches each writer's vital signs (`writer.VITALS`: a heartbeat counted by a thread
of the writer's own, and the main loop's progress). A writer whose heartbeat has been silent for
`UNRESPONSIVE_AFTER` (`STOPPED_AFTER` when the kernel says it is stopped) is unresponsive: the
requests waiting on it are answered at once (503, try again; their bodies stay in the spool) and new
ones are not sent to it, so no front-end thread waits on a stopped process (if it runs again, it
skips the appends answered so: `writer.ABANDONED`). One that holds work and shows neither heartbeat
nor progress for the stall timeout (`--writer-stall-timeout`) is killed with SIGKILL, so that it can
never write stale bytes later, and replaced like a dead one. A writer that is only slow (a rate
limit's sleep, a long write) keeps its heartbeat and is never touched.

The monitor also watches the Manager's process: when it dies, `on_manager_death` (the runtime) starts
a new one and calls `restart_all` (see `Runtime._heal`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from upload_server import metrics
from upload_server.sessions import record as states
from upload_server.sessions.live import LiveSessions
from upload_server.sessions.record import Session

from . import writer
from .messages import Append, Command, Concat, Drain, Event, Nudge, Ping, Reply, Shutdown

log = logging.getLogger("upload_server.pool")


CRASH_WINDOW = 10.0  # seconds over which a writer's deaths are counted
CRASHES_BEFORE_DELAY = 3  # deaths in the window before restarts are delayed
MAX_RESTART_DELAY = 30.0
UNRESPONSIVE_AFTER = 1.0  # seconds of heartbeat silence before requests stop waiting on a writer
# ... or this many, when the kernel says the process is stopped (SIGSTOP, a debugger; Linux only)
STOPPED_AFTER = 0.3
START_ALLOWANCE = 60.0  # seconds a new writer may take to beat for the first time (spawn imports)
CHECK_INTERVAL = 0.1  # seconds between looks at the vital signs


class WriterUnavailable(Exception):
    """No answer from the writer in time, or it died while holding the request."""


@dataclass
class _Handle:
    index: int
    process: Any
    inbox: Connection
    replies: Connection
    vitals: Any = None
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    restarts: int = 0
    replacing: bool = False
    sent: int = 0  # messages put in its inbox
    started: float = field(default_factory=time.monotonic)
    beat: int = 0  # the heartbeat and progress last seen, and when each last changed
    beat_at: float = field(default_factory=time.monotonic)
    steps: int = 0
    steps_at: float = field(default_factory=time.monotonic)
    unresponsive: bool = False
    wanted: bool = False  # a request was refused while it was unresponsive
    progress_warned: bool = False

    def holds_work(self) -> bool:
        """Tasks under way, or messages it has not taken yet (as far as it last said)."""
        if self.vitals is None:
            return False
        return bool(self.vitals[writer.TASKS]) or self.vitals[writer.RECEIVED] < self.sent


@dataclass
class _Pending:
    index: int
    message: Any
    future: Future
    resend: bool


class WriterPool:
    def __init__(
        self,
        ctx: Any,
        manager: Any,
        live: LiveSessions,
        settings: writer.WriterSettings,
        count: int,
        log_level: str = "INFO",
        log_format: str = "auto",
        stall_timeout: float = 10.0,
    ) -> None:
        self._ctx = ctx
        self.stall_timeout = stall_timeout
        self._manager = manager
        self._live = live
        self._settings = settings
        self._count = count
        self._log_level = log_level
        self._log_format = log_format
        self._handles: list[_Handle] = []
        self._pending: dict[int, _Pending] = {}
        self._controls: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._round_robin = itertools.cycle(range(count))
        self._closing = False
        self._monitor: threading.Thread | None = None
        self.restarts = 0
        self.last_death: float | None = None  # time.monotonic() of the latest writer death
        self._restart_times: dict[int, list[float]] = {}
        # (when, dead writer): replacements waiting out a crash loop
        self._delayed: list[tuple[float, _Handle]] = []
        self.on_event: Callable[[Event], None] | None = None
        self.stalls = 0  # writers killed because they stalled
        self.healing = False  # the Manager is being replaced: requests are answered 503 at once
        self.manager_sentinel: Any = None
        self.on_manager_death: Callable[[], None] | None = None
        self._checked = 0.0

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, ready_timeout: float = 60.0) -> None:
        """Start the writers and wait until each answers, so the server never listens (nor says it
        is ready) while its writers are still importing: under `spawn` that takes seconds."""
        self._handles = [self._spawn(i) for i in range(self._count)]
        self._monitor = threading.Thread(target=self._watch, name="writer-monitor", daemon=True)
        self._monitor.start()
        deadline = time.monotonic() + ready_timeout
        while (answered := self.ping()) < self._count:
            if time.monotonic() >= deadline:
                log.warning(
                    "%d of %d writers answer after %.0fs", answered, self._count, ready_timeout
                )
                return

    def _spawn(self, index: int) -> _Handle:
        inbox_recv, inbox_send = self._ctx.Pipe(duplex=False)
        replies_recv, replies_send = self._ctx.Pipe(duplex=False)
        settings = writer.WriterSettings(**{**self._settings.__dict__, "index": index})
        vitals = self._ctx.Array("Q", writer.VITALS, lock=False)
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
            ),
            name=f"upload-writer-{index}",
            daemon=True,
        )
        process.start()
        inbox_recv.close()
        replies_send.close()
        return _Handle(index, process, inbox_send, replies_recv, vitals)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask every writer to checkpoint and exit; kill the ones that do not in `timeout`."""
        self._closing = True
        for handle in self._handles:
            with contextlib.suppress(OSError, ValueError):
                self._send(handle.index, Shutdown())
        deadline = time.monotonic() + timeout
        for handle in self._handles:
            handle.process.join(max(0.0, deadline - time.monotonic()))
            if handle.process.is_alive():
                log.warning("writer %d did not stop in time; killing it", handle.index)
                handle.process.kill()
                handle.process.join(2)
        with self._lock:
            pending, self._pending = self._pending, {}
        for item in pending.values():
            item.future.set_exception(WriterUnavailable("the server is shutting down"))
        self._controls.clear()

    @property
    def count(self) -> int:
        return self._count

    def alive(self) -> int:
        return sum(1 for h in self._handles if h.process.is_alive())

    def pids(self) -> list[int]:
        return [h.process.pid for h in self._handles]

    def ping(self, timeout: float = 1.0) -> int:
        """How many writers answer within `timeout` (alive and not stuck)."""
        futures = []
        for handle in self._handles:
            if handle.unresponsive or self.healing:
                continue  # a stopped writer's pipe may be full: never block on it
            request_id = self.next_request_id()
            future: Future = Future()
            with self._lock:
                self._pending[request_id] = _Pending(handle.index, None, future, False)
            futures.append((request_id, future))
            with contextlib.suppress(OSError, ValueError):
                self._send(handle.index, Ping(request_id))
        deadline = time.monotonic() + timeout
        answered = 0
        for request_id, future in futures:
            with contextlib.suppress(FutureTimeout, WriterUnavailable):
                future.result(max(0.0, deadline - time.monotonic()))
                answered += 1
            with self._lock:
                self._pending.pop(request_id, None)
        return answered

    def queue_depths(self) -> list[int]:
        """Requests waiting for an answer, per writer."""
        depths = [0] * self._count
        with self._lock:
            for pending in self._pending.values():
                depths[pending.index] += 1
        return depths

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
        being replaced gets it with the replacement (see `_replace`)."""
        with contextlib.suppress(OSError, ValueError):
            self._send(self._handle_for(session).index, Drain(session.id))

    def append(self, session: Session, message: Append, timeout: float) -> Reply:
        return self._request(session, message, timeout, resend=True)

    def concat(self, session: Session, message: Concat, timeout: float) -> Reply:
        return self._request(session, message, timeout, resend=True)

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
            session, Nudge(session.id, queue), timeout, resend=False, request_id=request_id
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

    def _handle_for(self, session: Session) -> _Handle:
        return self._handles[session.writer % self._count]

    def _request(
        self,
        session: Session,
        message: Any,
        timeout: float,
        *,
        resend: bool,
        request_id: int | None = None,
    ) -> Reply:
        handle = self._handle_for(session)
        self._check_reachable(handle)
        request_id = request_id if request_id is not None else message.request_id
        future: Future = Future()
        with self._lock:
            self._pending[request_id] = _Pending(handle.index, message, future, resend)
        try:
            try:
                self._send(handle.index, message)
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
            with self._lock:
                self._pending.pop(request_id, None)

    def _check_reachable(self, handle: _Handle) -> None:
        """Answer at once rather than wait on a writer that cannot answer (see the module doc)."""
        if self.healing:
            raise WriterUnavailable("the server is restarting its session store; try again")
        if handle.unresponsive:
            handle.wanted = True
            raise WriterUnavailable(
                f"writer {handle.index} is not responding; it is being replaced; try again"
            )

    def _send(self, index: int, message: Any) -> None:
        handle = self._handles[index]
        with handle.send_lock:
            handle.inbox.send(message)
            handle.sent += 1

    # -- supervision --------------------------------------------------------------------------

    def _watch(self) -> None:
        """Receive replies, notice deaths and start replacements.

        Replacements are started from this thread only: a writer asks the kernel to kill it when the
        thread that started it ends (PR_SET_PDEATHSIG), so a short-lived thread must never start one.
        """
        while not self._closing:
            now = time.monotonic()
            for due in [d for d in self._delayed if d[0] <= now]:
                self._delayed.remove(due)
                self._replace(due[1])
            if now - self._checked >= CHECK_INTERVAL:
                self._checked = now
                self._check_vitals(now)
            live = [h for h in self._handles if not h.replacing]
            handles = {h.replies: h for h in live}
            sentinels = {h.process.sentinel: h for h in live}
            manager = [self.manager_sentinel] if self.manager_sentinel is not None else []
            timeout = min([CHECK_INTERVAL, *(when - now for when, _ in self._delayed)])
            try:
                ready = wait([*manager, *handles, *sentinels], timeout=max(timeout, 0.0))
            except OSError:
                continue
            if self._closing:
                return
            if manager and manager[0] in ready:
                self._manager_died()
                continue  # every writer was replaced: the old handles mean nothing now
            for item in ready:
                if self._closing:
                    return
                handle = handles.get(item)
                if handle is not None:
                    self._receive(handle)
                else:
                    self._restart(sentinels[item])

    def _check_vitals(self, now: float) -> None:
        """Notice unresponsive writers (answer their waiting requests now) and stalled ones (kill
        and replace them); see the module doc."""
        for handle in list(self._handles):
            if handle.replacing or handle.vitals is None:
                continue
            beat, steps = handle.vitals[writer.BEAT], handle.vitals[writer.STEPS]
            if beat != handle.beat:
                handle.beat, handle.beat_at = beat, now
                if handle.unresponsive:
                    log.warning("writer %d answers again", handle.index)
                handle.unresponsive = handle.wanted = False
            if steps != handle.steps:
                handle.steps, handle.steps_at, handle.progress_warned = steps, now, False
            silent = now - handle.beat_at
            still = now - handle.steps_at
            if not handle.beat:  # not started yet (imports under spawn take seconds)
                if silent >= max(self.stall_timeout, START_ALLOWANCE):
                    self._stalled(handle, silent)
                continue
            busy = handle.holds_work() or handle.wanted or self._waiting_on(handle.index)
            if not handle.unresponsive and (
                silent >= min(UNRESPONSIVE_AFTER, self.stall_timeout)
                or (silent >= STOPPED_AFTER and _stopped(handle.process.pid))
            ):
                handle.unresponsive = True
                handle.vitals[writer.ABANDONED] = handle.sent  # see writer.ABANDONED
                log.warning(
                    "writer %d (pid %s): no heartbeat for %.1fs; answering its requests 503 "
                    "until it answers again or is replaced",
                    handle.index,
                    handle.process.pid,
                    silent,
                )
                self._fail_waiting(
                    handle.index,
                    f"writer {handle.index} is not responding; it is being replaced; try again",
                )
            if busy and silent >= self.stall_timeout and still >= self.stall_timeout:
                self._stalled(handle, silent)
            elif (
                busy
                and still >= self.stall_timeout
                and not handle.unresponsive
                and not handle.progress_warned
            ):
                handle.progress_warned = True
                log.warning(
                    "writer %d (pid %s) holds work and has made no progress for %.0fs, but its "
                    "heartbeat goes on (a slow disk?); it is left running",
                    handle.index,
                    handle.process.pid,
                    still,
                )

    def _waiting_on(self, index: int) -> bool:
        with self._lock:
            return any(p.index == index for p in self._pending.values())

    def _fail_waiting(self, index: int, reason: str) -> None:
        """Answer every request waiting on writer `index` now (the waiting threads get a 503)."""
        with self._lock:
            mine = [p for p in self._pending.values() if p.index == index]
        for pending in mine:
            if not pending.future.done():
                with contextlib.suppress(Exception):
                    pending.future.set_exception(WriterUnavailable(reason))

    def _stalled(self, handle: _Handle, silent: float) -> None:
        """Kill a writer that holds work and shows no sign of life, and replace it."""
        self.stalls += 1
        log.error(
            "writer %d (pid %s) holds work and showed no heartbeat or progress for %.1fs "
            "(--writer-stall-timeout %.1fs); killing it",
            handle.index,
            handle.process.pid,
            silent,
            self.stall_timeout,
        )
        with contextlib.suppress(OSError):
            os.kill(handle.process.pid, getattr(signal, "SIGKILL", signal.SIGTERM))
        handle.process.join(5)
        self._restart(handle)

    def _manager_died(self) -> None:
        self.manager_sentinel = None
        log.error("the session Manager died; restarting it and every writer")
        if self.on_manager_death is not None:
            self.on_manager_death()

    def restart_all(self, manager: Any) -> None:
        """Replace every writer (the Manager they were connected to was replaced): kill the old
        ones first, so none writes a record while the new view is built from the records; the
        requests waiting on them are answered 503 (their clients retry). Call `kill_all` first,
        then rebuild the view, then this; from the monitor thread only (see `_watch`)."""
        self._manager = manager
        with self._lock:
            self._controls.clear()
        self._handles = [self._spawn(i) for i in range(self._count)]
        self._delayed.clear()
        self._fail_all("the server is restarting its session store; try again")

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            pending = list(self._pending.values())
        for item in pending:
            if not item.future.done():
                with contextlib.suppress(Exception):
                    item.future.set_exception(WriterUnavailable(reason))

    def kill_all(self) -> None:
        """SIGKILL every writer and answer every waiting request (see `restart_all`)."""
        for handle in self._handles:
            handle.replacing = True
            with contextlib.suppress(OSError):
                handle.process.kill()
        for handle in self._handles:
            handle.process.join(5)
            metrics.mark_dead(handle.process.pid)
            for end in (handle.inbox, handle.replies):
                with contextlib.suppress(OSError):
                    end.close()
        self._fail_all("the server is restarting its session store; try again")

    def _receive(self, handle: _Handle) -> None:
        try:
            while handle.replies.poll(0):
                self._resolve(handle.replies.recv())
        except (EOFError, OSError):
            self._restart(handle)

    def _resolve(self, reply: Reply | Event) -> None:
        if isinstance(reply, Event):
            if self.on_event is not None:
                try:
                    self.on_event(reply)
                except Exception:
                    log.exception("handling a %s event failed", reply.kind)
            return
        with self._lock:
            pending = self._pending.get(reply.request_id)
        if pending is not None and not pending.future.done():
            pending.future.set_result(reply)

    def _restart(self, dead: _Handle) -> None:
        """Replace a dead writer: at once, or after a growing delay when it keeps dying (a crash
        loop, such as a writer that cannot start), so the monitor never spins."""
        if self._closing or self._handles[dead.index] is not dead or dead.replacing:
            return  # already being replaced
        dead.replacing = True
        dead.process.join(1)
        with contextlib.suppress(OSError):
            dead.inbox.close()
        with contextlib.suppress(OSError):
            dead.replies.close()
        metrics.mark_dead(dead.process.pid)
        now = time.monotonic()
        self.last_death = now
        recent = [t for t in self._restart_times.get(dead.index, []) if now - t < CRASH_WINDOW]
        self._restart_times[dead.index] = [*recent, now]
        delay = min(MAX_RESTART_DELAY, 2.0 ** (len(recent) - CRASHES_BEFORE_DELAY + 1))
        if len(recent) < CRASHES_BEFORE_DELAY:
            delay = 0.0
        log.error(
            "writer %d (pid %s) died with exit code %s; starting a replacement%s",
            dead.index,
            dead.process.pid,
            dead.process.exitcode,
            f" in {delay:.0f}s (it keeps dying)" if delay else "",
        )
        if delay:
            self._delayed.append((now + delay, dead))
        else:
            self._replace(dead)

    def _replace(self, dead: _Handle) -> None:
        if self._closing:
            return
        replacement = self._spawn(dead.index)
        replacement.restarts = dead.restarts + 1
        self._handles[dead.index] = replacement
        self.restarts += 1
        with self._lock:
            mine = [(rid, p) for rid, p in self._pending.items() if p.index == dead.index]
        for request_id, pending in mine:
            if pending.future.done():
                continue  # answered already (503 while it was unresponsive): its client retries
            if pending.resend:
                self._send(dead.index, pending.message)
            else:
                with self._lock:
                    self._pending.pop(request_id, None)
                pending.future.set_exception(
                    WriterUnavailable("the writer restarted before answering; try again")
                )
        for session in self._live.all():
            if (
                session.writer % self._count == dead.index
                and (session.protocol == states.SEED or session.segments)
                and session.state in (states.QUEUED, states.WRITING)
            ):
                self._send(dead.index, Drain(session.id))


def _stopped(pid: int | None) -> bool:
    """The kernel's word that a process is stopped (state T or t in /proc; False elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False
