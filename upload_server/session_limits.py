"""The limits on unfinished sessions: in total, and per credential (or per client with auth off).

The count is kept as sessions start and end (never by walking the live view), under one lock, so a
creation checks and takes its place at once and concurrent creations cannot overshoot a limit. It is
rebuilt at start-up from the recovered records, which carry each session's `limit_key`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from . import errors
from .sessions.record import Session


class SessionLimits:
    def __init__(self, max_sessions: int, max_per_owner: int, sessions: Iterable[Session]) -> None:
        self.max_sessions = max_sessions
        self.max_per_owner = max_per_owner
        self._lock = threading.Lock()
        self._active: dict[str | None, set[str]] = {}  # unfinished session ids by limit key
        self._saved: set[str] = set()  # those of them whose record exists (not only a place taken)
        for session in sessions:
            if not session.is_final:
                self.count(session)

    def take(self, key: str | None, session_id: str, *, by_client: bool) -> None:
        """Check the per-owner limit for `key` (a credential, or with auth off the client's
        address key: no one client can use up the server's share for everyone), then the global
        one, and count `session_id` under `key`; 429 when either is reached."""
        with self._lock:
            mine = len(self._active.get(key, ()))
            everyone = sum(len(ids) for ids in self._active.values())
            if mine < self.max_per_owner and everyone < self.max_sessions:
                self._active.setdefault(key, set()).add(session_id)
                return
        if mine >= self.max_per_owner:
            who = "this client (address)" if by_client else "this credential"
            raise errors.UploadError(
                f"{who} already has {mine} unfinished uploads; finish or terminate some",
                code="too_many_sessions",
                status=429,
                headers={"Retry-After": "60"},
            )
        raise errors.UploadError(
            "the server has too many unfinished uploads; try again later",
            code="server_busy",
            status=429,
            headers={"Retry-After": "60"},
        )

    def count(self, session: Session) -> None:
        """Count a session that exists (saved), whether or not it took its place by `take`."""
        with self._lock:
            self._active.setdefault(session.limit_key, set()).add(session.id)
            self._saved.add(session.id)

    def release(self, key: str | None, session_id: str) -> None:
        """Give a place back: a creation that failed, or a session that ended."""
        with self._lock:
            self._discard(key, session_id)

    def ended(self, session: Session) -> None:
        """A session reached a final state; a record that lost its key is looked for."""
        with self._lock:
            key = session.limit_key
            if session.id not in self._active.get(key, ()):
                key = next((k for k, ids in self._active.items() if session.id in ids), key)
            self._discard(key, session.id)

    def saved(self) -> set[str]:
        """The counted sessions whose records exist now: what `forget_ended` may judge."""
        with self._lock:
            return set(self._saved)

    def forget_ended(self, counted: set[str], unfinished: Iterable[Session]) -> None:
        """An upload counted here may end where this front end does not hear of it (on another
        node, whose writer tells only its own front end). `counted` is `saved()` taken before
        `unfinished` was listed: any of them no longer unfinished has ended. (A place taken by
        a creation whose record is not saved yet is never in `counted`, so it is never lost.)"""
        still = {s.id for s in unfinished if not s.is_final}
        ended = counted - still
        with self._lock:
            for key, ids in list(self._active.items()):
                ids -= ended
                if not ids:
                    del self._active[key]
            self._saved -= ended

    def _discard(self, key: str | None, session_id: str) -> None:
        self._saved.discard(session_id)
        ids = self._active.get(key)
        if ids is not None:
            ids.discard(session_id)
            if not ids:
                del self._active[key]
