"""A writer process: moves spooled bytes into upload data, one chunk at a time.

A writer owns the sessions pinned to it (`held`). It keeps a round-robin list of tasks (a seed
drain, a tus append, a concatenation: `drain`, `append`, `concat`), each a generator that copies
one chunk per step, so a long upload never starves the others on the same writer, and between
chunks it reads its inbox, where a `Nudge` points it at a session's control queue (`control`). Each
chunk is read into one reused buffer and hashed there (the whole file's SHA-256, plus a tus
Upload-Checksum), and copied into the data by the kernel (`fileio.ChunkReader`, `storage`). A task
that waits for another task of its session parks (`context.PARK`) and costs no turns until woken.

This module is the loop: the inbox, the task round-robin, the rate limit, the vital signs the
pool's monitor reads, and shutdown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from upload_server import logs, processes
from upload_server.layout import Layout
from upload_server.sessions import lifecycle
from upload_server.sessions.live import LiveSessions, LiveViewLost
from upload_server.sessions.store import SessionStore
from upload_server.sessions.versions import Counters
from upload_server.storage import Storage

from .append import append
from .concat import concat
from .context import PARK, Context, Task
from .control import read_controls
from .drain import drain
from .follow import IDLE, claim, follow, locate
from .held import STATE, HeldSessions
from .messages import Append, Claim, Concat, Drain, Follow, Locate, Nudge, Ping, Shutdown
from .outbox import Outbox
from .policy import policy_for
from .settings import WriterSettings

__all__ = ["VITALS", "Writer", "WriterSettings", "main"]

log = logging.getLogger("upload_server.writer")

# The writer's vital signs, a small shared array the pool's monitor reads (`WriterPool`): a heartbeat
# counted by a thread of its own, the main loop's turns (progress, a rate limit's sleeps included),
# the tasks it holds and the messages it has taken from its inbox. ABANDONED is written by the pool:
# the messages sent up to it whose requesters were told it was unavailable while it did not answer;
# if it runs again, it skips the appends among them that it had not taken yet (their clients retry,
# and may already have spooled a new body under the same segment name).
BEAT, STEPS, TASKS, RECEIVED, ABANDONED = range(5)
VITALS = 5
HEARTBEAT_INTERVAL = 0.1  # seconds
MAX_SLEEP = 0.5  # the loop turns at least this often while it holds work (a rate limit's sleep)


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
        self.tasks: deque[Task] = deque()
        self.parked: dict[str, list[Task]] = {}  # by session: tasks waiting for another (`PARK`)
        self.stopping = False
        policy = policy_for(settings.backends, live, store)
        outbox = Outbox(replies)
        self.held = HeldSessions(settings, storage, layout, store, live, policy, outbox, self.busy)
        self.ctx = Context(settings, storage, layout, policy, self.held, outbox, self)

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
        while not self.stopping:
            if not self.turn(self._idle_timeout()):
                return  # the front end is gone
        self.held.checkpoint_all()

    def turn(self, timeout: float | None = 0.0) -> bool:
        """One turn of the loop: take every message the inbox holds (waiting up to `timeout` for
        one), then run one step of the next task. False when the front end is gone."""
        try:
            ready = self.inbox.poll(timeout)
        except (EOFError, OSError):
            return False
        if ready:
            try:
                self._receive_all()
            except EOFError:
                return False
        if not self.stopping:
            self.step()
            self.held.release_idle(self.has_tasks)
        self.vitals[STEPS] += 1
        self.vitals[TASKS] = len(self.tasks) + sum(map(len, self.parked.values()))
        return True

    def _idle_timeout(self) -> float | None:
        timeouts = []
        if self.tasks:
            due = min(t.next_time for t in self.tasks) - time.monotonic()
            timeouts.append(min(MAX_SLEEP, max(0.0, due)))
        release = self.held.release_due()
        if release is not None:
            timeouts.append(release)
        return min(timeouts, default=None)

    def _receive_all(self) -> None:
        while self.inbox.poll(0):
            message = self.inbox.recv()
            self.vitals[RECEIVED] += 1
            if isinstance(message, Append | Concat) and (
                self.vitals[RECEIVED] <= self.vitals[ABANDONED]
            ):
                log.warning(
                    "writer %d: skipping request %d for %s, refused while this writer was stopped",
                    self.settings.index,
                    message.request_id,
                    message.session_id,
                )
                continue
            self.handle(message)
            if self.stopping:
                return

    def handle(self, message: object) -> None:
        """Take one message from the inbox: queue work, apply commands, answer a ping."""
        if isinstance(message, Nudge):
            read_controls(self.ctx, message)
        elif isinstance(message, Append):
            self.tasks.append(Task(message.session_id, append(self.ctx, message), message))
        elif isinstance(message, Concat):
            self.tasks.append(Task(message.session_id, concat(self.ctx, message), message))
        elif isinstance(message, Drain):
            self.start_drain(message.session_id)
        elif isinstance(message, Follow):
            task = Task(f"follow:{message.key}", follow(self.ctx, message), message, idle=IDLE)
            self.tasks.append(task)
        elif isinstance(message, Locate):
            locate(self.ctx, message)
        elif isinstance(message, Claim):
            claim(self.ctx, message)
        elif isinstance(message, Ping):
            self.ctx.reply(message.request_id)
        elif isinstance(message, Shutdown):
            self.stopping = True
        else:
            log.error("writer %d: unknown message %r", self.settings.index, message)

    def step(self) -> None:
        """Run one step (one chunk) of the next task that is due, round-robin."""
        now = time.monotonic()
        for _ in range(len(self.tasks)):
            task = self.tasks[0]
            self.tasks.rotate(-1)
            if task.next_time > now:
                continue
            try:
                copied = next(task.steps)
            except StopIteration:
                self.remove(task)
                return
            except LiveViewLost:
                raise
            except Exception:
                log.exception("writer %d: task for %s failed", self.settings.index, task.session_id)
                self.remove(task)
                self._fail_task(task, "internal_error", "the writer failed; see the server log")
                return
            if copied == PARK:
                self.remove(task)
                self.parked.setdefault(task.session_id, []).append(task)
                return
            if not copied and task.idle:
                task.next_time = now + task.idle
                return
            rate = self.settings.max_bytes_per_second
            if rate:
                task.next_time = max(task.next_time, now) + copied / rate
            return

    def _fail_task(self, task: Task, code: str, message: str) -> None:
        """A bug, not a client error: fail the session visibly rather than leave it "writing"."""
        held = self.held.get(task.session_id)
        if held is not None:
            lifecycle.fail(held.session, code, message)
            with contextlib.suppress(Exception):
                held.checkpoint(STATE)
        self.ctx.outbox.reply(
            task.request_id, held.session if held else None, code=code, message=message
        )

    # -- the scheduler tasks and commands see (`context.Scheduler`) ---------------------------

    def tasks_of(self, session_id: str) -> list[Task]:
        return [t for t in self.tasks if t.session_id == session_id] + self.parked.get(
            session_id, []
        )

    def has_tasks(self, session_id: str) -> bool:
        return session_id in self.parked or any(t.session_id == session_id for t in self.tasks)

    def busy(self, session_id: str) -> bool:
        """A task of this session has started here (this writer's record is the newest)."""
        return any(t.started for t in self.tasks_of(session_id))

    def remove(self, task: Task) -> None:
        with contextlib.suppress(ValueError):
            self.tasks.remove(task)
        parked = self.parked.get(task.session_id)
        if parked and task in parked:
            parked.remove(task)
            if not parked:
                del self.parked[task.session_id]

    def wake(self, session_id: str) -> None:
        self.tasks.extend(self.parked.pop(session_id, ()))

    def start_drain(self, session_id: str) -> None:
        if any(isinstance(t.message, Drain) and t.session_id == session_id for t in self.tasks):
            return  # already draining
        self.tasks.append(Task(session_id, drain(self.ctx, session_id), Drain(session_id)))


def main(
    settings: WriterSettings,
    inbox: Connection,
    replies: Connection,
    sessions_proxy: Any,
    log_level: str,
    log_format: str,
    vitals: Any = None,
    counters: Any = None,
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
        LiveSessions(sessions_proxy, Counters(counters) if counters is not None else None),
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
