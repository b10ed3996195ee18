"""The live view of every session: a `multiprocessing.Manager` dict shared by all processes.

The front end reads it to answer status and HEAD without asking a writer; writers replace a session's
record in it after every chunk. Values are plain dicts replaced whole (the Manager does not proxy
nested values), so a reader always sees one consistent record.
"""

from __future__ import annotations

from typing import Any

from .record import Session


class LiveSessions:
    def __init__(self, proxy: Any) -> None:
        self._proxy = proxy

    @property
    def proxy(self) -> Any:
        """The underlying DictProxy, to hand to a writer process."""
        return self._proxy

    def get(self, session_id: str) -> Session | None:
        data = self._proxy.get(session_id)
        return Session.from_dict(data) if data is not None else None

    def put(self, session: Session) -> None:
        self._proxy[session.id] = session.to_dict()

    def remove(self, session_id: str) -> None:
        self._proxy.pop(session_id, None)

    def all(self) -> list[Session]:
        """A snapshot of every record (one round trip to the Manager)."""
        return [Session.from_dict(d) for d in self._proxy.copy().values()]

    def __len__(self) -> int:
        return len(self._proxy)
