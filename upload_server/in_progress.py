"""The sessions in progress (neither final nor failed): what the active-sessions gauge shows.

The set is kept as sessions change, never by walking the live view, so a scrape of `/metrics`
costs the same at any history size. It is seeded once from the recovered records; then the front
end tells it of each session it creates (or takes back) and of every record a writer sends it, an
answer or an event (`WriterPool.on_record`, `SessionService._on_writer_event`). Those arrive on the
pool's monitor thread in the order the session's one writer wrote them, so a late answer never
undoes a later event (a resumed upload that completes at once counts out, not in).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from .sessions import record as states
from .sessions.record import Session


def is_in_progress(state: str) -> bool:
    return state not in states.FINAL_STATES and state != states.FAILED


class InProgress:
    def __init__(self, sessions: Iterable[Session], on_change: Callable[[int], None]) -> None:
        """`on_change(count)` is called with the new count whenever it changes (and once now)."""
        self._lock = threading.Lock()
        self._ids = {s.id for s in sessions if is_in_progress(s.state)}
        self._on_change = on_change
        on_change(len(self._ids))

    def observe(self, session_id: str, state: str) -> None:
        """The session is now in `state`."""
        with self._lock:
            before = len(self._ids)
            if is_in_progress(state):
                self._ids.add(session_id)
            else:
                self._ids.discard(session_id)
            if len(self._ids) != before:
                self._on_change(len(self._ids))

    def discard(self, session_id: str) -> None:
        """The session is gone (a creation taken back)."""
        self.observe(session_id, states.TERMINATED)

    def __len__(self) -> int:
        return len(self._ids)
