"""Which sessions this server answers for, and where a command on one of them runs.

The front end (`service.SessionService`), start-up recovery and the sweeper ask a directory, never which
mode they run in. With one server (`LocalDirectory`) every session is its own: the live view
answers and commands run here. With several nodes (`cluster.directory.ClusterDirectory`) the shared
records answer and a command runs on the node holding the upload. `Backends.open_directory` is the
one place that picks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ..locks import Locks, UploadLocks
from .live import LiveSessions
from .recent import RecentRecords
from .record import Session
from .store import SessionStore

T = TypeVar("T")
# applies a command with this node's writer: (session, action, args) -> the session after it
Apply = Callable[[Session, str, dict[str, Any]], Session]
# answers a command another node sent here: (session id, action, args) -> the session after it
Serve = Callable[[str, str, dict[str, Any]], Session]


class SessionDirectory(Protocol):
    node_id: str | None
    """Stamped on the records this server creates (`Session.node`); None with one server."""
    locks: Locks
    """What a tus request holds while it works on an upload."""

    def lookup(self, session_id: str) -> Session | None:
        """The freshest record of a session, as this server should answer for it."""

    def all(self) -> list[Session]:
        """What the sweeper looks at: the live view (one server), or every unfinished record
        (several: the shared index, never the whole history)."""

    def owns(self, session: Session) -> bool:
        """The record is this server's: start-up recovery takes it up, and a seed upload's spool
        is here."""

    def route(self, session: Session, action: str, args: dict[str, Any], apply: Apply) -> Session:
        """Apply a command where the upload is held (`apply` if that is here)."""

    def run_here(self, upload_id: str, action: Callable[[], T]) -> T:
        """Run `action` while no other server may write the upload."""

    def share(self, session: Session) -> None:
        """Make a change this server made outside its writers (start-up recovery) visible to
        whoever reads the records."""

    def evict(self, session_id: str) -> None:
        """The session leaves this server's live view, or its record changed outside a writer
        (retention): drop what is held of it here; its record answers from now on."""

    def start(self, serve: Serve) -> None:
        """Begin answering (with `serve`) the commands other servers send here."""

    def stop(self) -> None:
        """Let go of everything held for other servers (after the writers have stopped)."""

    def problems(self) -> list[str]:
        """Why this server cannot serve uploads now, for /readyz."""


class LocalDirectory:
    """One server: the live view is the truth for every session in it, every record is its own,
    commands run here. A session that has left the live view (finished, `--live-grace` ago)
    answers from its durable record, the recently asked ones from memory."""

    node_id = None

    def __init__(self, live: LiveSessions, store: SessionStore) -> None:
        self.live = live
        self.store = store
        self.locks = UploadLocks()
        self.recent = RecentRecords()

    def lookup(self, session_id: str) -> Session | None:
        session = self.live.get(session_id)
        if session is None:
            session = self.recent.get(session_id, self.store.load)
        return session

    def all(self) -> list[Session]:
        return self.live.all()

    def owns(self, session: Session) -> bool:
        return True

    def route(self, session: Session, action: str, args: dict[str, Any], apply: Apply) -> Session:
        return apply(session, action, args)

    def run_here(self, upload_id: str, action: Callable[[], T]) -> T:
        return action()

    def share(self, session: Session) -> None:
        """Nobody else reads the records: the live view is put right by recovery itself."""

    def evict(self, session_id: str) -> None:
        self.live.remove(session_id)
        self.recent.forget(session_id)

    def start(self, serve: Serve) -> None:
        """There are no other servers."""

    def stop(self) -> None:
        """Nothing is held for others."""

    def problems(self) -> list[str]:
        return []
