"""Durable session records: the interface, and the default store of JSON files beside the data.

A `SessionStore` keeps one record per session so that a restarted server can rebuild its live view.
Callers may rely on `save` being atomic (a reader or a restart sees the old or the new record, never a
mix) and, when `durable=True`, on the record having reached the disk before `save` returns.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from .. import portable
from .record import Session, is_session_id

log = logging.getLogger("upload_server.store")


class SessionStore(Protocol):
    def save(self, session: Session, *, durable: bool) -> None:
        """Write the whole record atomically; with `durable`, fsync it before returning."""

    def load(self, session_id: str) -> Session | None:
        """The stored record, or None when there is none (or it is unreadable)."""

    def delete(self, session_id: str) -> None:
        """Forget the record; deleting a missing record is not an error."""

    def all(self) -> Iterator[Session]:
        """Every readable stored record (unreadable ones are logged and skipped)."""


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable (a no-op where directories cannot be opened)."""
    if os.name == "nt" or portable.active():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSessionStore:
    """Records as `<id>.json` files in one directory, written with write, fsync, rename."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, session_id: str) -> Path:
        if not is_session_id(session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        return self.directory / f"{session_id}.json"

    def save(self, session: Session, *, durable: bool) -> None:
        path = self._path(session.id)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        data = json.dumps(session.to_dict(), separators=(",", ":")).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o600)
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            fsync_dir(self.directory)

    def load(self, session_id: str) -> Session | None:
        try:
            return self._read(self._path(session_id))
        except (FileNotFoundError, ValueError):
            return None

    def _read(self, path: Path) -> Session | None:
        try:
            return Session.from_dict(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            log.warning("skipping unreadable session record %s: %s", path, exc)
            return None

    def delete(self, session_id: str) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            self._path(session_id).unlink()

    def all(self) -> Iterator[Session]:
        for path in sorted(self.directory.glob("*.json")):
            session = self._read(path)
            if session is not None:
                yield session
