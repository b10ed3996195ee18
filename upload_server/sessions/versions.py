"""Live records the front end may answer from memory: HEAD and status without a Manager round trip.

Under load the Manager is a process that must be scheduled for every lookup (p99 10-15 ms with
16 uploads on 2 cores). So each writer process gets an array of counters (`new_counters`), one
per slot of session ids, that only it increments: twice around every change it makes to a live
record (`Counters.changing`: odd while it changes one, a seqlock). The front end keeps the records
it read (`RecordCache`) with the counter it saw before and after the read, and answers from one
only while that counter has not moved since: a record the Manager no longer holds is never shown.
An offset only grows once stored, but a failed write can move it back; either change moves the
counter, so such a record is read again, never shown from memory.
"""

from __future__ import annotations

import pickle
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

SLOTS = 4096  # counters per writer: sessions sharing one only read the Manager more often
MAX_RECORDS = 10_000  # records kept at most; all are dropped past it (they are read again)

Record = dict[str, Any]


def slot(session_id: str) -> int:
    """The counter of a session id (the same in every process, unlike `hash`)."""
    return zlib.crc32(session_id.encode()) % SLOTS


def new_counters(ctx: Any) -> Any:
    """A writer's counters, shared with the front end (a new array for every writer process,
    so a writer killed between its two increments leaves nothing odd behind for the next)."""
    return ctx.Array("Q", SLOTS, lock=False)


class Counters:
    """A writer's side: it changes live records only inside `changing`."""

    def __init__(self, counters: Any) -> None:
        self._counters = counters

    @contextmanager
    def changing(self, session_id: str) -> Iterator[None]:
        i = slot(session_id)
        self._counters[i] += 1
        try:
            yield
        finally:
            self._counters[i] += 1


class RecordCache:
    """The front end's side: records read from the Manager, kept while their counter stands.

    `counters()` gives the current writers' arrays by writer index (None for a writer being
    replaced; none at all while the live view is rebuilt: its records are then read). The front end's own changes
    to the live view (creation, removal, a new Manager) call `forget`/`clear`, which also stop a
    read running meanwhile from keeping what it read."""

    def __init__(self, counters: Callable[[], Sequence[Any]]) -> None:
        self._counters = counters
        # id -> (writer index, the record pickled: each answer gets a copy of its own, the
        # writer's counters, the count seen)
        self._records: dict[str, tuple[int, bytes, Any, int]] = {}
        self._generation = 0  # moved by the front end's own changes
        self._lock = threading.Lock()

    def get(self, session_id: str) -> Record | None:
        """The record as the Manager holds it now, if kept; else None."""
        entry = self._records.get(session_id)
        if entry is None:
            return None
        writer, record, counters, seen = entry
        if self._current(writer, counters) and counters[slot(session_id)] == seen:
            return pickle.loads(record)
        return None

    def read(self, session_id: str, load: Callable[[], Record | None]) -> Record | None:
        """`load()` (a Manager read), kept when no writer changed the record meanwhile."""
        i = slot(session_id)
        arrays = list(self._counters())
        before = [counters[i] if counters is not None else 1 for counters in arrays]
        generation = self._generation
        record = load()
        if record is None:
            return None
        writer = record.get("writer")
        if not isinstance(writer, int) or not 0 <= writer < len(arrays):
            return record
        counters, seen = arrays[writer], before[writer]
        if (
            counters is not None
            and seen % 2 == 0
            and counters[i] == seen
            and self._current(writer, counters)
        ):
            entry = (writer, pickle.dumps(record), counters, seen)
            with self._lock:
                if generation == self._generation:
                    if len(self._records) >= MAX_RECORDS:
                        self._records.clear()
                    self._records[session_id] = entry
        return record

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._generation += 1
            self._records.pop(session_id, None)

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._records.clear()

    def _current(self, writer: int, counters: Any) -> bool:
        """`counters` are still those of writer `writer` (not of one since replaced)."""
        arrays = self._counters()
        return writer < len(arrays) and arrays[writer] is counters
