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

from .sessions import lifecycle
from .sessions import record as states
from .sessions.record import Session


class InProgress:
    def __init__(self, sessions: Iterable[Session], on_change: Callable[[int], None]) -> None:
        """`on_change(count)` is called with the new count whenever it changes (and once now)."""
        self._lock = threading.Lock()
        self._on_change = on_change
        self._ids: set[str] = set()
        self.recount(sessions)

    def recount(self, sessions: Iterable[Session]) -> None:
        """Count afresh from every live record (start-up, and after the Manager was replaced:
        an event its writers could not send is not missed for ever)."""
        with self._lock:
            self._ids = {s.id for s in sessions if lifecycle.is_in_progress(s.state)}
            self._on_change(len(self._ids))

    def observe(self, session_id: str, state: str) -> None:
        """The session is now in `state`."""
        with self._lock:
            before = len(self._ids)
            if lifecycle.is_in_progress(state):
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
