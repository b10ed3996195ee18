"""Where a writer's records live: on this node alone, or shared by several nodes (cluster mode).

Chosen once, when the writer starts (`policy_for`); the loop and the tasks ask it and never ask
whether they run in a cluster. What differs:

- how a session is looked up, and whether the copy a writer holds is still the newest (another
  node may have written a shared record since);
- whether a request body may be named in the record as a spool segment (a segment is on one
  node's disk, so with a shared store a body counts only once committed to the storage);
- whether a record that reconciliation changed is saved at once (other nodes read it);
- the node that wrote a record (a seed upload's spool is on that node);
- letting go of an upload left idle (its next request may well go to another node; without this
  every upload that ever passed through a node would keep a buffer file there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from upload_server.backends import Backends
from upload_server.sessions import lifecycle
from upload_server.sessions import record as states
from upload_server.sessions.live import LiveSessions
from upload_server.sessions.record import Session
from upload_server.sessions.store import SessionStore

IDLE_RELEASE = 30.0  # seconds an upload of a shared store may sit untouched before it is let go


class RecordPolicy(Protocol):
    segments: bool
    save_reconciled: bool
    idle_release: float | None

    def load(self, session_id: str, cached: Session | None) -> Session | None:
        """The record to work on: `cached` (the one this writer holds) while it is the newest,
        another when someone else wrote it since, None when the session is gone."""

    def stamp(self, session: Session) -> None:
        """Mark the record as written by this node, before it is saved."""


@dataclass
class OneNode:
    """Only this node's writers write these records: the one a writer holds is always the newest."""

    live: LiveSessions
    store: SessionStore
    segments: bool = True
    save_reconciled: bool = False
    idle_release: float | None = None

    def load(self, session_id: str, cached: Session | None) -> Session | None:
        if cached is not None:
            return cached
        return self.live.get(session_id) or self.store.load(session_id)

    def stamp(self, session: Session) -> None:
        pass


@dataclass
class SharedRecords:
    """The records in the shared store are the truth; any node may have written one since."""

    store: SessionStore
    node_id: str
    segments: bool = False
    save_reconciled: bool = True
    idle_release: float | None = IDLE_RELEASE

    def load(self, session_id: str, cached: Session | None) -> Session | None:
        stored = self.store.load(session_id)
        if stored is None:
            return None
        if cached is not None and not _moved_on(cached, stored):
            return cached
        if stored.state in (states.QUEUED, states.WRITING) and stored.node != self.node_id:
            lifecycle.wait_for_client(stored, "the node that was writing it stopped")
        return stored

    def stamp(self, session: Session) -> None:
        session.node = self.node_id


def policy_for(backends: Backends, live: LiveSessions, store: SessionStore) -> RecordPolicy:
    if backends.node_id is not None:
        return SharedRecords(store, backends.node_id)
    return OneNode(live, store)


def _moved_on(held: Session, stored: Session) -> bool:
    """The shared record was written by someone else since this writer last saved it."""
    mine = (held.updated_at, held.bytes_written, held.state, held.node)
    return (stored.updated_at, stored.bytes_written, stored.state, stored.node) != mine
