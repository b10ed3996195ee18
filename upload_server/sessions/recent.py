"""The records of recently looked-up sessions that have left the live view.

A finished session leaves the live view after `--live-grace`; a client polling its status then would
read its record from the store on every request. These few hundred records answer instead. A
record here never goes stale unnoticed: whatever changes a session puts it back in the live view,
which is asked first, and whatever moves one out of it (eviction, retention) `forget`s it here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from .record import Session

SIZE = 512


class RecentRecords:
    """A small LRU of records read from the store, by session id."""

    def __init__(self, size: int = SIZE) -> None:
        self._size = size
        self._records: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str, load: Callable[[str], Session | None]) -> Session | None:
        """The remembered record, else `load`'s (remembered when there is one)."""
        with self._lock:
            session = self._records.get(session_id)
            if session is not None:
                self._records.move_to_end(session_id)
                return Session.from_dict(session.to_dict())  # callers may change their copy
        session = load(session_id)
        if session is not None:
            with self._lock:
                self._records[session_id] = Session.from_dict(session.to_dict())
                while len(self._records) > self._size:
                    self._records.popitem(last=False)
        return session

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._records.pop(session_id, None)
