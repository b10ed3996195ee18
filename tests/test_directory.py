"""The session directories in-process: what one server and one node of several answer for, without
a server, a Manager or Redis (a plain dict stands in for the live view, files for the shared
records, a stub for the cluster node)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from upload_server.cluster.directory import ClusterDirectory
from upload_server.locks import UploadLocks
from upload_server.sessions import lifecycle
from upload_server.sessions import record as states
from upload_server.sessions.directory import LocalDirectory
from upload_server.sessions.live import LiveSessions
from upload_server.sessions.record import Session, new_session_id
from upload_server.sessions.store import FileSessionStore


class StubNode:
    """What `ClusterDirectory` asks of `ClusterNode`: who is alive, and where commands run."""

    def __init__(self, node_id: str, alive: set[str]) -> None:
        self.node_id = node_id
        self.locks = UploadLocks()
        self.living = alive | {node_id}
        self.routed: list[str] = []

    def alive(self, node_id: str) -> bool:
        return node_id in self.living

    def route(self, session: Session, action: str, args: dict[str, Any], here: Any) -> Session:
        self.routed.append(action)
        return here(session, action, args)

    def run_here(self, upload_id: str, action: Callable[[], Any]) -> Any:
        return action()


def _session(node: str | None, state: str = states.WRITING, **fields: Any) -> Session:
    return Session(
        id=fields.pop("id", None) or new_session_id(),
        protocol=fields.pop("protocol", states.SEED),
        filename="f.bin",
        chunk_size=1024,
        writer=0,
        total_bytes=10,
        state=state,
        node=node,
        **fields,
    )


@pytest.fixture
def store(tmp_path: Path) -> FileSessionStore:
    return FileSessionStore(tmp_path / "sessions")


def _cluster(store: FileSessionStore, live: LiveSessions) -> ClusterDirectory:
    return ClusterDirectory(store, live, StubNode("a", alive={"b"}))


def test_one_server_answers_from_its_live_view(store: FileSessionStore) -> None:
    live = LiveSessions({})
    directory = LocalDirectory(live, store)
    session = _session(None)
    live.put(session)
    store.save(session, durable=False)
    assert directory.node_id is None
    assert directory.lookup(session.id) == session
    assert directory.all() == [session]
    assert directory.owns(session)
    assert directory.route(session, "pause", {}, lambda s, a, _: s) is session
    directory.evict(session.id)  # it left the live view: its record answers
    assert directory.lookup(session.id) == session


def test_a_record_left_writing_by_a_dead_node_waits_for_its_client(store: FileSessionStore) -> None:
    directory = _cluster(store, LiveSessions({}))
    dead, living = _session("gone"), _session("b")
    for session in (dead, living):
        store.save(session, durable=False)
    seen = directory.lookup(dead.id)
    assert seen is not None and seen.state == states.WAITING
    assert seen.error is not None and seen.error["code"] == "spool_missing"
    assert {s.id: s.state for s in directory.all()} == {
        dead.id: states.WAITING,
        living.id: states.WRITING,
    }
    assert store.load(dead.id).state == states.WRITING  # only as seen


def test_a_node_answers_from_its_live_view_when_its_own_writer_is_ahead(
    store: FileSessionStore,
) -> None:
    live = LiveSessions({})
    directory = _cluster(store, live)
    stored = _session("a", bytes_written=2, updated_at=100.0)
    store.save(stored, durable=False)
    live.put(_session("a", id=stored.id, bytes_written=6, updated_at=101.0))
    assert directory.lookup(stored.id).bytes_written == 6
    live.put(_session("a", id=stored.id, bytes_written=1, updated_at=99.0))
    assert directory.lookup(stored.id).bytes_written == 2
    elsewhere = _session("b", bytes_written=3)
    store.save(elsewhere, durable=False)
    live.put(_session("b", id=elsewhere.id, bytes_written=9, updated_at=elsewhere.updated_at + 1))
    assert directory.lookup(elsewhere.id).bytes_written == 3


def test_a_node_owns_what_it_stamped_and_shares_what_it_recovers(store: FileSessionStore) -> None:
    directory = _cluster(store, LiveSessions({}))
    mine, theirs = _session("a"), _session("b")
    assert directory.node_id == "a"
    assert directory.owns(mine) and not directory.owns(theirs)
    lifecycle.wait_for_client(mine, "the server restarted")
    directory.share(mine)
    assert store.load(mine.id).state == states.WAITING
    directory.evict(mine.id)  # the shared record answers
    assert directory.lookup(mine.id) is not None
    assert directory.route(theirs, "pause", {}, lambda s, a, _: s) is theirs
    assert directory.node.routed == ["pause"]
