"""One request at a time per upload: the protocol the tus resources hold, and its one-server form.

The resources only ever `hold` an upload; whether that is a lock of this process (`UploadLocks`)
or, with several nodes, a lease in Redis as well (`cluster.leases.LeaseLocks`) is chosen when the
app is built, so neither the resources nor the locks depend on each other's side.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Protocol

from . import errors


class Locks(Protocol):
    def hold(self, upload_id: str, wait: float = 0.0) -> contextlib.AbstractContextManager[None]:
        """Hold the upload for one request, or raise `errors.Locked` (423) after `wait` seconds."""
        ...


class UploadLocks:
    """One request at a time per upload, within this process.

    A second request is refused at once with 423, which tus clients retry. Entries live only while
    someone holds or waits for them."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, list] = {}  # upload id -> [lock, users]

    @contextlib.contextmanager
    def hold(self, upload_id: str, wait: float = 0.0) -> Iterator[None]:
        with self._guard:
            entry = self._locks.setdefault(upload_id, [threading.Lock(), 0])
            entry[1] += 1
        try:
            lock = entry[0]
            acquired = lock.acquire(timeout=wait) if wait else lock.acquire(blocking=False)
            if not acquired:
                raise errors.Locked(
                    "another request is writing to this upload; retry when it has finished",
                    code="upload_locked",
                )
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    self._locks.pop(upload_id, None)
