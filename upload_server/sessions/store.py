"""Durable session records: the interface, and the default store of JSON files beside the data.

A `SessionStore` keeps one record per session so that a restarted server can rebuild its live view.
Callers may rely on `save` being atomic (a reader or a restart sees the old or the new record, never a
mix) and, when `durable=True`, on the record having reached the disk before `save` returns.

A store keeps the unfinished records apart from the finished ones (`lifecycle.is_filed_as_finished`),
so that start-up reads only what may still change (`unfinished`), however long the history.
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
from . import lifecycle
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

    def unfinished(self) -> Iterator[Session]:
        """Every readable record that is not filed as finished: what start-up rebuilds the live
        view from, at a cost that follows these alone."""

    def finished_before(self, cutoff: float) -> Iterator[str]:
        """Ids of finished records and tombstones last saved before `cutoff`: the candidates for
        retention (the caller reads each and asks the rules). A store that expires records
        itself (Redis, with a TTL) has none."""


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
    """Records as `<id>.json` files written with write, fsync, rename: unfinished ones in the
    directory itself, finished ones in `finished/`, tombstones in `tombstones/`. A record moves on
    by being saved in its new place, then unlinked from the old; `load` looks in the later places
    first, so a crash between the two steps leaves the newer record in force, and `unfinished`
    drops the stale one. Records of a final state found in the directory itself (written before
    this layout, or stale) are filed as finished by that same pass: the first start-up migrates an
    old directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.finished = directory / "finished"
        self.tombstones = directory / "tombstones"
        for place in (directory, self.finished, self.tombstones):
            place.mkdir(parents=True, exist_ok=True)
        self._later_first = (self.tombstones, self.finished, directory)

    def _name(self, session_id: str) -> str:
        if not is_session_id(session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        return f"{session_id}.json"

    def _place(self, session: Session) -> Path:
        if lifecycle.is_tombstone(session):
            return self.tombstones
        if lifecycle.is_filed_as_finished(session):
            return self.finished
        return self.directory

    def save(self, session: Session, *, durable: bool) -> None:
        name = self._name(session.id)
        place = self._place(session)
        path = place / name
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
            fsync_dir(place)
        if place is not self.directory:  # an unfinished record is never anywhere else
            later = True
            for other in self._later_first:
                if other is place:
                    later = False
                elif later:
                    self._unlink(other / name, durable)
                else:
                    # No directory fsync: an older record left in an earlier place by a crash is
                    # shadowed (`load` reads later places first) and dropped by `unfinished`.
                    self._unlink(other / name, False)

    @staticmethod
    def _unlink(path: Path, durable: bool) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            return
        if durable:
            fsync_dir(path.parent)

    def load(self, session_id: str) -> Session | None:
        try:
            name = self._name(session_id)
        except ValueError:
            return None
        for place in self._later_first:
            session = self._read(place / name)
            if session is not None:
                return session
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
        with contextlib.suppress(ValueError):
            name = self._name(session_id)
            for place in self._later_first:
                with contextlib.suppress(FileNotFoundError):
                    (place / name).unlink()

    def all(self) -> Iterator[Session]:
        for place in reversed(self._later_first):
            for path in sorted(place.glob("*.json")):
                session = self._read(path)
                if session is not None:
                    yield session

    def unfinished(self) -> Iterator[Session]:
        for path in sorted(self.directory.glob("*.json")):
            if (self.finished / path.name).exists() or (self.tombstones / path.name).exists():
                path.unlink(missing_ok=True)  # stale: a crash came as it was filed as finished
                continue
            session = self._read(path)
            if session is None:
                continue
            if lifecycle.is_filed_as_finished(session):
                self.save(session, durable=True)  # an old layout's record: filed once, here
                continue
            yield session

    def finished_before(self, cutoff: float) -> Iterator[str]:
        for place in (self.finished, self.tombstones):
            with os.scandir(place) as entries:
                for entry in entries:
                    if entry.name.endswith(".json"):
                        with contextlib.suppress(FileNotFoundError):
                            if entry.stat().st_mtime < cutoff:
                                yield entry.name[: -len(".json")]
