"""What a writer's tasks are given: the storage, the sessions it holds, a way to answer, and
the few things they ask of the loop that schedules them.

A task (a seed drain, a tus append, a concatenation) is a generator that copies one chunk per
step; the loop (`writer.Writer`) runs the tasks of all its sessions round-robin. A task works on
one `Held` session and reaches everything else through `Context`, so each module of tasks
depends on this small surface rather than on the loop.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

from upload_server.layout import Layout
from upload_server.sessions.lifecycle import Refusal
from upload_server.sessions.record import Session
from upload_server.storage import Storage

from .held import HeldSessions
from .messages import Append, Concat, Drain, Follow
from .outbox import Outbox
from .policy import RecordPolicy
from .settings import WriterSettings

# What a task's step yields, instead of the bytes it moved, to wait for another task of its
# session: the loop sets it aside until that task calls `Scheduler.wake`, so a waiting task costs
# no turns of the loop.
PARK = -1


class Interrupted(Refusal):
    """Thrown into a task when a command stops it; its code and message are what its requester
    is told."""


@dataclass
class Task:
    session_id: str
    steps: Generator[int, None, None]
    message: Append | Concat | Drain | Follow
    next_time: float = 0.0
    idle: float = 0.0  # a step that moves nothing makes it wait this long (a body to arrive)

    @property
    def request_id(self) -> int | None:
        return getattr(self.message, "request_id", None)

    @property
    def started(self) -> bool:
        """It has copied (or is waiting to copy) at least one chunk: stopping it needs its own
        clean-up, thrown into it as `Interrupted`."""
        return inspect.getgeneratorstate(self.steps) == inspect.GEN_SUSPENDED


class Scheduler(Protocol):
    """What tasks and commands ask of the loop."""

    def tasks_of(self, session_id: str) -> list[Task]: ...

    def remove(self, task: Task) -> None: ...

    def start_drain(self, session_id: str) -> None:
        """Carry the session on by itself (unless a drain of it is queued already)."""

    def wake(self, session_id: str) -> None:
        """Run the session's parked tasks again (they yielded `PARK`)."""


@dataclass
class Context:
    settings: WriterSettings
    storage: Storage
    layout: Layout
    policy: RecordPolicy
    sessions: HeldSessions
    outbox: Outbox
    scheduler: Scheduler
    # seed file parts hashed while their bodies arrive, by body, and their digests once claimed,
    # by session (`follow`)
    received: dict[tuple[int, int], Any] = field(default_factory=dict)
    spool_digests: dict[str, Any] = field(default_factory=dict)

    def refuse(self, request_id: int | None, session_id: str, refusal: Refusal) -> None:
        """Answer with a refusal and the record as this writer holds it (none once let go)."""
        held = self.sessions.get(session_id)
        self.outbox.refuse(request_id, held.session if held else None, refusal)

    def reply(self, request_id: int | None, session: Session | None = None) -> None:
        self.outbox.reply(request_id, session)

    def remove_spool(self, session_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.layout.spool(session_id).unlink()
        for segment in self.layout.spool_dir.glob(f"{session_id}.*.seg"):
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()
