"""The live view of every session: a `multiprocessing.Manager` dict shared by all processes.

The front end reads it to answer status and HEAD without asking a writer; writers replace a session's
record in it after every chunk. Values are plain dicts replaced whole (the Manager does not proxy
nested values), so a reader always sees one consistent record.

When the Manager process dies, every call raises `LiveViewLost` (a 503 with Retry-After for a
client, never a 500) until the runtime has started a new Manager, rebuilt the view from the durable
records and put the new dict in place (`replace`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import Unavailable
from .record import Session
from .versions import Counters, RecordCache

# What a proxy raises once its Manager is gone: refused, reset or broken connections, or EOF.
_LOST = (OSError, EOFError)


class LiveViewLost(Unavailable):
    """The Manager that holds the live view does not answer; the server is restarting it."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(
            f"the server's session store is restarting ({type(cause).__name__}); try again",
            code="sessions_unavailable",
            headers={"Retry-After": "1"},
        )


class LiveSessions:
    """The live view as one process uses it: a writer's changes move its `counters`, and the
    front end answers from its `cache` while they stand (see `versions`)."""

    def __init__(self, proxy: Any, counters: Counters | None = None) -> None:
        self._proxy = proxy
        self.counters = counters
        self.cache: RecordCache | None = None

    def replace(self, proxy: Any) -> None:
        """Use a new Manager's dict (after the old Manager died and the view was rebuilt)."""
        self._proxy = proxy
        if self.cache is not None:
            self.cache.clear()

    @property
    def proxy(self) -> Any:
        """The underlying DictProxy, to hand to a writer process."""
        return self._proxy

    def get(self, session_id: str) -> Session | None:
        cache = self.cache
        data = cache.get(session_id) if cache is not None else None
        if data is None:
            load = lambda: self._load(session_id)  # noqa: E731
            data = cache.read(session_id, load) if cache is not None else load()
        return Session.from_dict(data) if data is not None else None

    def _load(self, session_id: str) -> dict[str, Any] | None:
        try:
            return self._proxy.get(session_id)
        except _LOST as exc:
            raise LiveViewLost(exc) from None

    def put(self, session: Session) -> None:
        self.put_record(session.id, session.to_dict())

    def put_record(self, session_id: str, record: dict[str, Any]) -> None:
        """Put a record already encoded (`Session.to_dict`)."""
        with self._changing(session_id):
            self._proxy[session_id] = record

    def remove(self, session_id: str) -> None:
        with self._changing(session_id):
            self._proxy.pop(session_id, None)

    @contextmanager
    def _changing(self, session_id: str) -> Iterator[None]:
        """A change to one live record: counted by a writer; the front end forgets what it
        kept of the record before and after (a read meanwhile keeps nothing)."""
        cache = self.cache
        if cache is not None:
            cache.forget(session_id)
        try:
            if self.counters is None:
                yield
            else:
                with self.counters.changing(session_id):
                    yield
        except _LOST as exc:
            raise LiveViewLost(exc) from None
        finally:
            if cache is not None:
                cache.forget(session_id)

    def all(self) -> list[Session]:
        """A snapshot of every record (one round trip to the Manager)."""
        try:
            records = self._proxy.copy()
        except _LOST as exc:
            raise LiveViewLost(exc) from None
        return [Session.from_dict(d) for d in records.values()]

    def __len__(self) -> int:
        try:
            return len(self._proxy)
        except _LOST as exc:
            raise LiveViewLost(exc) from None
