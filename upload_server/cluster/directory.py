"""The session directory of one node among several: the shared records answer for every session,
and a command runs on the node holding the upload (`node.ClusterNode`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..sessions import lifecycle
from ..sessions import record as states
from ..sessions.directory import Apply, Serve
from ..sessions.live import LiveSessions
from ..sessions.record import Session
from ..sessions.store import SessionStore
from .node import ClusterNode

T = TypeVar("T")


class ClusterDirectory:
    def __init__(self, store: SessionStore, live: LiveSessions, node: ClusterNode) -> None:
        self.store = store
        self.live = live
        self.node = node
        self.node_id = node.node_id
        self.locks = node.locks

    def lookup(self, session_id: str) -> Session | None:
        """The shared record, or this node's live view when its own writer has newer news (a seed
        upload draining here checkpoints once a second)."""
        stored = self.store.load(session_id)
        if stored is not None and stored.node == self.node_id:
            live = self.live.get(session_id)
            if live is not None and live.updated_at >= stored.updated_at:
                return live
        return self._as_seen(stored) if stored is not None else None

    def all(self) -> list[Session]:
        return [self._as_seen(s) for s in self.store.unfinished()]

    def _as_seen(self, session: Session) -> Session:
        """A record left `writing` by a node that is gone waits for its client."""
        if (
            session.state in (states.QUEUED, states.WRITING)
            and session.node
            and not self.node.alive(session.node)
        ):
            lifecycle.wait_for_client(session, "the node that was writing it stopped")
        return session

    def owns(self, session: Session) -> bool:
        """The record was last written by this node (under the same `--node-id`)."""
        return session.node == self.node_id

    def route(self, session: Session, action: str, args: dict[str, Any], apply: Apply) -> Session:
        return self.node.route(session, action, args, apply)

    def run_here(self, upload_id: str, action: Callable[[], T]) -> T:
        return self.node.run_here(upload_id, action)

    def share(self, session: Session) -> None:
        """Other nodes read the shared record, not this node's live view."""
        self.store.save(session, durable=True)

    def evict(self, session_id: str) -> None:
        """The shared records answer; this node's live view only holds its writers' news."""
        self.live.remove(session_id)

    def start(self, serve: Serve) -> None:
        self.node.start(serve)

    def stop(self) -> None:
        self.node.stop()

    def problems(self) -> list[str]:
        return self.node.problems()
