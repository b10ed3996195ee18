"""Requests sent to writers and waiting for their `Reply`, by request id.

Each waiting front-end thread holds a `Future`; the pool's monitor resolves it with the writer's
reply, or fails it (`WriterUnavailable`: `writer_unavailable` for the client, who retries) when
the writer cannot answer.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from .messages import Reply


class WriterUnavailable(Exception):
    """No answer from the writer in time, or it died while holding the request."""


@dataclass
class Pending:
    index: int  # the writer it was sent to
    message: Any
    future: Future
    resend: bool  # sent again to a replacement if the writer dies (work, not commands)


class PendingRequests:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[int, Pending] = {}

    def add(self, request_id: int, index: int, message: Any, *, resend: bool) -> Future:
        future: Future = Future()
        with self._lock:
            self._items[request_id] = Pending(index, message, future, resend)
        return future

    def drop(self, request_id: int) -> None:
        with self._lock:
            self._items.pop(request_id, None)

    def resolve(self, reply: Reply) -> None:
        with self._lock:
            pending = self._items.get(reply.request_id)
        if pending is not None and not pending.future.done():
            pending.future.set_result(reply)

    def of(self, index: int) -> list[tuple[int, Pending]]:
        with self._lock:
            return [(rid, p) for rid, p in self._items.items() if p.index == index]

    def waiting_on(self, index: int) -> bool:
        with self._lock:
            return any(p.index == index for p in self._items.values())

    def depths(self, count: int) -> list[int]:
        """Requests waiting for an answer, per writer."""
        depths = [0] * count
        with self._lock:
            for pending in self._items.values():
                depths[pending.index] += 1
        return depths

    def fail(self, reason: str, index: int | None = None) -> None:
        """Answer every request waiting (on writer `index`, or on any) now: its thread gets a
        `WriterUnavailable`, its client `writer_unavailable`."""
        with self._lock:
            mine = [p for p in self._items.values() if index is None or p.index == index]
        for pending in mine:
            if not pending.future.done():
                with contextlib.suppress(Exception):
                    pending.future.set_exception(WriterUnavailable(reason))

    def close(self, reason: str) -> None:
        """Fail every request and forget them all (the pool shuts down)."""
        with self._lock:
            items, self._items = self._items, {}
        for item in items.values():
            item.future.set_exception(WriterUnavailable(reason))
