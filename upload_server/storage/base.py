"""The contract between the writers and a storage backend, after tusd's DataStore and Upload.

Backends know nothing of HTTP or sessions' states: a writer opens an upload's data, writes bytes at
offsets it has already checked, commits them, and publishes the data when the upload is complete.
An optional capability is its own tiny protocol (`ReadBack`, `Adopting`), checked with `isinstance`,
like tusd's optional extension interfaces.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import BinaryIO, Protocol, runtime_checkable


class CommittedData(OSError):
    """`truncate` was asked to cut bytes the backend has already committed and cannot take back
    (S3 parts). They were committed by an append that passed every check, so the caller keeps them."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


class UploadData(Protocol):
    """One upload's data while it is written. Only the writer holding the upload has it open."""

    def size(self) -> int:
        """Bytes stored so far: after a crash this may exceed the durable offset, never trail it
        unless the OS lost unsynced data."""

    def write(self, data: memoryview, offset: int) -> None:
        """Store all of `data` at `offset` or raise OSError; a short write is never reported."""

    def truncate(self, size: int) -> None:
        """Drop everything past `size` (rolls back a rejected or unacknowledged chunk). Bytes
        written since the last `commit` can always be dropped; older ones may raise
        `CommittedData`."""

    def commit(self, *, whole: bool) -> None:
        """Put what was written where another node can continue from it, before a shared record
        counts it. `whole=False` may keep a tail back (called once a second while a seed upload
        drains); `whole=True` keeps nothing back (the end of an append, a state change). Local
        files need nothing: the next process sees them as they are."""

    def sync(self) -> None:
        """Make what was written durable on this machine's disk (the fsync policy)."""

    def close(self) -> None:
        """Release what this process holds; committed data stays."""


@runtime_checkable
class CopyingIn(Protocol):
    """Optional: data that can take bytes straight from a spool file (local files: with
    `copy_file_range`, inside the kernel). A writer then only reads a chunk to hash it, and the
    copy does not pass through its memory: half its CPU per byte, and steadier than a `pwrite`
    from a mapping."""

    def write_from(self, src_fd: int, src_offset: int, length: int, offset: int) -> None:
        """Store `length` bytes of the file `src_fd` from `src_offset` at `offset`, as `write`."""


@runtime_checkable
class ReadBack(Protocol):
    """Optional: data that can be read while incomplete (local files can; an unfinished S3
    multipart upload cannot). Writers use it to rebuild a running SHA-256 and to concatenate."""

    def view(self, offset: int, length: int) -> AbstractContextManager[memoryview]:
        """A read-only view of bytes [offset, offset + length)."""


@runtime_checkable
class Adopting(Protocol):
    """Optional: storage that can take a seed upload's whole spool as its data without copying
    it (local files: a rename). Writers then only hash the spool; others copy it chunk by chunk."""

    def adopt(self, session_id: str, path: str) -> bool:
        """Make the complete file at `path` the upload's data without copying it (a rename),
        or return False when this storage cannot, and the writer copies instead."""


class Storage(Protocol):
    def open(self, session_id: str) -> UploadData:
        """Create the upload's data, or reopen what an earlier process (on any node that shares
        this storage) committed."""

    def size(self, session_id: str) -> int | None:
        """Bytes stored for an unpublished upload, or None when it has no data."""

    def publish(
        self, session_id: str, filename: str, *, durable: bool, note: Callable[[str], None]
    ) -> str:
        """Make complete, committed data visible (under `filename` where the backend names files;
        never overwriting another file) and return its location. `note(location)` is called
        before the location becomes visible, so the caller can write it down first."""

    def finish_publish(
        self, session_id: str, location: str, filename: str, *, durable: bool
    ) -> str:
        """After a crash: finish a publish that was noted for `location` (it may have happened
        whole, in part, or not at all) and return where the data is; FileNotFoundError if the
        data is nowhere."""

    def discard(self, session_id: str) -> None:
        """Remove an unpublished upload's data; a missing one is not an error."""

    def remove(self, location: str) -> None:
        """Remove a published file (terminating a completed upload); a missing one is not an
        error."""

    def open_published(self, location: str | None, session_id: str) -> tuple[BinaryIO, int]:
        """A binary reader (seekable, for Range requests) and the size of a published (or complete
        unpublished) upload; FileNotFoundError when it is gone."""
