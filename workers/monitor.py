"""The pool's monitor thread: replies, deaths, stalls and replacements of the writer processes.

It watches every writer's reply pipe and process sentinel: a reply resolves the request waiting for
it (`PendingRequests`) and its record goes to `on_record`, an event goes to `on_event` (both in the
order the writer sent them); when a writer dies (killed, out of memory) it starts a replacement at
the same index and has the pool hand it the dead one's work (`on_replaced`): at once, or after a
growing delay when the writer keeps dying (a crash loop).

It also watches each writer's vital signs (`writer.VITALS`: a heartbeat counted by a thread of the
writer's own, and the main loop's progress). A writer whose heartbeat has been silent for
`UNRESPONSIVE_AFTER` (`STOPPED_AFTER` when the kernel says it is stopped) is unresponsive: the
requests waiting on it are answered at once (`writer_unavailable`: try again; their bodies stay in
the spool) and new ones are not sent to it, so no front-end thread waits on a stopped process (if
it runs again, it skips the appends answered so: `writer.ABANDONED`). One that holds work and shows neither heartbeat
nor progress for the stall timeout (`--writer-stall-timeout`) is killed with SIGKILL, so that it can
never write stale bytes later, and replaced like a dead one. A writer that is only slow (a rate
limit's sleep, a long write) keeps its heartbeat and is never touched.

And it watches the Manager's process: when it dies, `on_manager_death` (the runtime) starts a new
one and has the pool replace every writer (see `Runtime._heal`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from upload_server import metrics

from . import writer
from .messages import Event, Reply
from .pending import PendingRequests

log = logging.getLogger("upload_server.pool")

CRASH_WINDOW = 10.0  # seconds over which a writer's deaths are counted
CRASHES_BEFORE_DELAY = 3  # deaths in the window before restarts are delayed
MAX_RESTART_DELAY = 30.0
UNRESPONSIVE_AFTER = 1.0  # seconds of heartbeat silence before requests stop waiting on a writer
# ... or this many, when the kernel says the process is stopped (SIGSTOP, a debugger; Linux only)
STOPPED_AFTER = 0.3
START_ALLOWANCE = 60.0  # seconds a new writer may take to beat for the first time (spawn imports)
CHECK_INTERVAL = 0.1  # seconds between looks at the vital signs


@dataclass
class WriterHandle:
    """One writer process as the front end sees it: its pipes and what the monitor saw of it."""

    index: int
    process: Any
    inbox: Connection
    replies: Connection
    vitals: Any = None
    counters: Any = None  # its live records' change counters (`sessions.versions`)
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

    def send(self, message: Any) -> None:
        with self.send_lock:
            self.inbox.send(message)
            self.sent += 1

    def try_send(self, message: Any) -> bool:
        """Send unless another thread is sending (for waitress's I/O thread, which must not
        wait on a request thread)."""
        if not self.send_lock.acquire(blocking=False):
            return False
        try:
            self.inbox.send(message)
            self.sent += 1
        finally:
            self.send_lock.release()
        return True

    def holds_work(self) -> bool:
        """Tasks under way, or messages it has not taken yet (as far as it last said)."""
        if self.vitals is None:
            return False
        return bool(self.vitals[writer.TASKS]) or self.vitals[writer.RECEIVED] < self.sent

    def close(self) -> None:
        for end in (self.inbox, self.replies):
            with contextlib.suppress(OSError):
                end.close()


class Monitor:
    def __init__(
        self,
        spawn: Callable[[int], WriterHandle],
        pending: PendingRequests,
        stall_timeout: float,
        on_replaced: Callable[[int], None],
    ) -> None:
        self._spawn = spawn
        self._pending = pending
        self.stall_timeout = stall_timeout
        self._on_replaced = on_replaced
        self.handles: list[WriterHandle] = []
        self.closing = False
        self.restarts = 0
        self.stalls = 0  # writers killed because they stalled
        self.last_death: float | None = None  # time.monotonic() of the latest writer death
        self._restart_times: dict[int, list[float]] = {}
        # (when, dead writer): replacements waiting out a crash loop
        self._delayed: list[tuple[float, WriterHandle]] = []
        self._checked = 0.0
        self.on_event: Callable[[Event], None] | None = None
        # every record an answer carries, in the order its writer sent it (the count in progress)
        self.on_record: Callable[[dict[str, Any]], None] | None = None
        self.manager_sentinel: Any = None
        self.on_manager_death: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None

    def start(self, count: int) -> None:
        self.handles = [self._spawn(i) for i in range(count)]
        self._thread = threading.Thread(target=self._watch, name="writer-monitor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        """Receive replies, notice deaths and start replacements.

        Replacements are started from this thread only: a writer asks the kernel to kill it when the
        thread that started it ends (PR_SET_PDEATHSIG), so a short-lived thread must never start one.
        """
        while not self.closing:
            now = time.monotonic()
            for due in [d for d in self._delayed if d[0] <= now]:
                self._delayed.remove(due)
                self._replace(due[1])
            if now - self._checked >= CHECK_INTERVAL:
                self._checked = now
                self._check_vitals(now)
            live = [h for h in self.handles if not h.replacing]
            handles = {h.replies: h for h in live}
            sentinels = {h.process.sentinel: h for h in live}
            manager = [self.manager_sentinel] if self.manager_sentinel is not None else []
            timeout = min([CHECK_INTERVAL, *(when - now for when, _ in self._delayed)])
            try:
                ready = wait([*manager, *handles, *sentinels], timeout=max(timeout, 0.0))
            except OSError:
                continue
            if self.closing:
                return
            if manager and manager[0] in ready:
                self._manager_died()
                continue  # every writer was replaced: the old handles mean nothing now
            for item in ready:
                if self.closing:
                    return
                handle = handles.get(item)
                if handle is not None:
                    self._receive(handle)
                else:
                    self._restart(sentinels[item])

    def _check_vitals(self, now: float) -> None:
        """Notice unresponsive writers (answer their waiting requests now) and stalled ones (kill
        and replace them); see the module doc."""
        for handle in list(self.handles):
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
            busy = handle.holds_work() or handle.wanted or self._pending.waiting_on(handle.index)
            if not handle.unresponsive and (
                silent >= min(UNRESPONSIVE_AFTER, self.stall_timeout)
                or (silent >= STOPPED_AFTER and _stopped(handle.process.pid))
            ):
                handle.unresponsive = True
                handle.vitals[writer.ABANDONED] = handle.sent  # see writer.ABANDONED
                metrics.get().writers_unresponsive.inc()
                log.warning(
                    "writer %d (pid %s): no heartbeat for %.1fs; answering its requests unavailable "
                    "until it answers again or is replaced",
                    handle.index,
                    handle.process.pid,
                    silent,
                )
                self._pending.fail(
                    f"writer {handle.index} is not responding; it is being replaced; try again",
                    handle.index,
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

    def _stalled(self, handle: WriterHandle, silent: float) -> None:
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
        self._restart(handle, "stalled")

    def _manager_died(self) -> None:
        self.manager_sentinel = None
        log.error("the session Manager died; restarting it and every writer")
        if self.on_manager_death is not None:
            self.on_manager_death()

    def replace_all(self) -> None:
        """New writers at every index (after `kill_all`); from the monitor thread only."""
        self.handles = [self._spawn(i) for i in range(len(self.handles))]
        self._delayed.clear()

    def kill_all(self) -> None:
        """SIGKILL every writer (see `WriterPool.restart_all`)."""
        for handle in self.handles:
            handle.replacing = True
            with contextlib.suppress(OSError):
                handle.process.kill()
        for handle in self.handles:
            handle.process.join(5)
            metrics.mark_dead(handle.process.pid)
            handle.close()

    def _receive(self, handle: WriterHandle) -> None:
        try:
            while handle.replies.poll(0):
                self._resolve(handle.replies.recv())
        except (EOFError, OSError):
            self._restart(handle)

    def _resolve(self, reply: Reply | Event) -> None:
        if isinstance(reply, Event):
            self._hand(self.on_event, reply, f"a {reply.kind} event")
            return
        if reply.session is not None:
            self._hand(self.on_record, reply.session, "an answer's record")
        self._pending.resolve(reply)

    @staticmethod
    def _hand(handler: Callable[[Any], None] | None, message: Any, what: str) -> None:
        """Give the front end's handler `message`; its failure is logged, never this thread's."""
        if handler is None:
            return
        try:
            handler(message)
        except Exception:
            log.exception("handling %s failed", what)

    def _restart(self, dead: WriterHandle, reason: str = "died") -> None:
        """Replace a dead writer: at once, or after a growing delay when it keeps dying (a crash
        loop, such as a writer that cannot start), so the monitor never spins."""
        if self.closing or self.handles[dead.index] is not dead or dead.replacing:
            return  # already being replaced
        dead.replacing = True
        metrics.get().writer_restarts.labels(reason).inc()
        dead.process.join(1)
        dead.close()
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

    def _replace(self, dead: WriterHandle) -> None:
        if self.closing:
            return
        replacement = self._spawn(dead.index)
        replacement.restarts = dead.restarts + 1
        self.handles[dead.index] = replacement
        self.restarts += 1
        self._on_replaced(dead.index)


def _stopped(pid: int | None) -> bool:
    """The kernel's word that a process is stopped (state T or t in /proc; False elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False
