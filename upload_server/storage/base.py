"""The contract between the writers and a storage backend, after tusd's DataStore and Upload.

Backends know nothing of HTTP or sessions' states: a writer opens an upload's data, writes bytes at
offsets it has already checked, and publishes the data when the upload is complete.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import BinaryIO, Protocol


class UploadData(Protocol):
    """One upload's data while it is written. Only the session's writer holds it open."""

    def size(self) -> int:
        """Bytes stored so far: after a crash this may exceed the durable offset, never trail it
        unless the OS lost unsynced data."""

    def write(self, data: memoryview, offset: int) -> None:
        """Store all of `data` at `offset` or raise OSError; a short write is never reported."""

    def truncate(self, size: int) -> None:
        """Drop everything past `size` (rolls back a rejected or unacknowledged chunk)."""

    def sync(self) -> None:
        """Make what was written durable."""

    def view(self, offset: int, length: int) -> AbstractContextManager[memoryview]:
        """Read back a range (to rebuild a hash after a restart, or to concatenate uploads)."""

    def close(self) -> None: ...


class Storage(Protocol):
    def open(self, session_id: str) -> UploadData:
        """Create the upload's data, or reopen what an earlier process left."""

    def size(self, session_id: str) -> int | None:
        """Bytes stored for an unpublished upload, or None when it has no data."""

    def publish(self, session_id: str, filename: str, *, durable: bool) -> str:
        """Make complete data visible under `filename` (never overwriting another file) and
        return its location."""

    def adopt(self, session_id: str, path: str) -> bool:
        """Make the complete file at `path` the upload's data without copying it (a rename),
        or return False when this storage cannot, and the writer copies instead."""

    def discard(self, session_id: str) -> None:
        """Remove an unpublished upload's data; a missing one is not an error."""

    def open_published(self, location: str | None, session_id: str) -> tuple[BinaryIO, int]:
        """A binary reader and the size of a published (or complete unpublished) upload."""
