"""A server's history: finished sessions leave the live view after `--live-grace` and answer from
their records; retention reduces old records to tombstones, then removes them; start-up reads only
the unfinished records. In-process, with the app of `test_resources` (a plain dict as the live
view) and a sweep called with `now=`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from upload_server.config import Config
from upload_server.hooks import Hooks
from upload_server.runtime import Runtime
from upload_server.sessions import lifecycle
from upload_server.sessions import record as states
from upload_server.sessions.directory import LocalDirectory
from upload_server.sessions.live import LiveSessions
from upload_server.sessions.record import Session, new_session_id
from upload_server.sessions.store import FileSessionStore
from upload_server.sweeper import Sweeper

from .test_resources import Served, _id, _path, assert_error

pytestmark = pytest.mark.frontend

KEEP = 7 * 86400.0


@pytest.fixture
def served(tmp_path: Path) -> Served:
    return Served(tmp_path / "uploads", live_grace="0.5s")


def _as_written(served: Served, session_id: str) -> None:
    """What the writer does that the stand-in does not: save the record it put in the live view."""
    served.service.store.save(served.session(session_id), durable=False)


def _status(served: Served, session_id: str) -> object:
    return served.client.simulate_get("/upload/status", params={"sessionID": session_id})


def _sweep(served: Served, now: float) -> Sweeper:
    sweeper = Sweeper(served.service, 60.0)
    sweeper.sweep(now)
    return sweeper


def test_an_evicted_session_answers_the_same_status_and_downloads(served: Served) -> None:
    data = b"the evicted upload"
    url = served.upload(data)
    upload_id = _id(url)
    seed_id = served.seed_session()
    served.set_state(seed_id, states.FAILED)  # failed: resumable, it stays
    for session_id in (upload_id, seed_id):
        _as_written(served, session_id)
    before = _status(served, upload_id).json
    head_before = served.head(url).headers
    _sweep(served, time.time() + 1)
    assert upload_id not in served.live and seed_id in served.live
    after = _status(served, upload_id)
    assert after.status_code == 200 and after.json == before
    assert _status(served, upload_id).json == before  # from the recent records, the same
    batch = served.client.simulate_get("/upload/status", params={"sessionIDs": upload_id})
    assert batch.json == {"sessions": [before], "notFound": []}
    head = served.head(url)
    assert head.status_code == 200
    assert {k: head.headers.get(k) for k in ("upload-offset", "upload-length")} == {
        k: head_before.get(k) for k in ("upload-offset", "upload-length")
    }
    download = served.client.simulate_get(_path(url))
    assert download.status_code == 200 and download.content == data


def test_an_evicted_expired_upload_answers_410(served: Served) -> None:
    url = served.new(10)
    upload_id = _id(url)
    served.set_state(upload_id, states.EXPIRED)
    _as_written(served, upload_id)
    _sweep(served, time.time() + 1)
    assert upload_id not in served.live
    assert_error(served.head(url), 410)
    assert_error(served.patch(url, 0, b"abc"), 410, "expired")
    assert_error(_status(served, upload_id), 404, "session_expired")


def test_within_its_grace_a_finished_session_stays_live(served: Served) -> None:
    upload_id = _id(served.upload(b"x"))
    _as_written(served, upload_id)
    _sweep(served, time.time() - 10)
    assert upload_id in served.live


def _aged(served: Served, state: str, **fields: object) -> Session:
    """A record of `state`, saved as its writer would have."""
    upload_id = _id(served.new(10))
    session = served.session(upload_id)
    session.state = state
    session.metadata = {"name": "a"}
    for name, value in fields.items():
        setattr(session, name, value)
    served.live[upload_id] = session.to_dict()
    _as_written(served, upload_id)
    return session


def test_retention_reduces_to_tombstones_then_removes_them(served: Served) -> None:
    store = served.service.store
    data = b"kept for download"
    completed_id = _id(served.upload(data))
    _as_written(served, completed_id)
    terminated = _aged(served, states.TERMINATED)
    expired = _aged(served, states.EXPIRED)
    waiting = _aged(served, states.WAITING)
    failed = _aged(served, states.FAILED, error={"code": "disk", "message": "full"})
    untouched = {s.id: store.load(s.id) for s in (waiting, failed)}
    sweeper = Sweeper(served.service, 60.0)

    first = time.time() + KEEP + 10
    sweeper.retire(first)
    assert sweeper.reduced == 3 and sweeper.removed == 0
    for session_id in (completed_id, terminated.id, expired.id):
        tombstone = store.load(session_id)
        assert tombstone is not None and lifecycle.is_tombstone(tombstone)
        assert tombstone.metadata == {} and tombstone.reduced_at == first
    assert {i: store.load(i) for i in untouched} == untouched
    assert_error(_status(served, completed_id), 404, "session_ended")
    assert_error(_status(served, terminated.id), 404, "session_ended")
    assert_error(_status(served, expired.id), 404, "session_expired")
    assert_error(served.head(f"/files/{terminated.id}"), 410)
    download = served.client.simulate_get(f"/files/{completed_id}")
    assert download.status_code == 200 and download.content == data
    batch = served.client.simulate_get("/upload/status", params={"sessionIDs": completed_id})
    assert batch.json == {"sessions": [], "notFound": [completed_id]}

    sweeper.retire(first + KEEP - 10)  # not yet
    assert sweeper.removed == 0
    sweeper.retire(first + KEEP + 10)
    assert sweeper.removed == 3
    for session_id in (completed_id, terminated.id, expired.id):
        assert store.load(session_id) is None
    assert {i: store.load(i) for i in untouched} == untouched


def test_keep_finished_zero_keeps_records_for_ever(tmp_path: Path) -> None:
    served = Served(tmp_path / "uploads", keep_finished="0")
    upload_id = _id(served.upload(b"x"))
    _as_written(served, upload_id)
    Sweeper(served.service, 60.0).retire(time.time() + 100 * KEEP)
    assert not lifecycle.is_tombstone(served.service.store.load(upload_id))


# -- the store's layout, and start-up ------------------------------------------------------------


def _record(state: str, **fields: object) -> Session:
    return Session(
        id=new_session_id(), protocol=states.TUS, filename="f", chunk_size=4, writer=0,
        state=state, **fields,
    )  # fmt: skip


def test_finished_records_are_filed_apart_and_found(tmp_path: Path) -> None:
    store = FileSessionStore(tmp_path / "sessions")
    session = _record(states.WAITING)
    store.save(session, durable=True)
    assert (store.directory / f"{session.id}.json").exists()
    session.state = states.COMPLETED
    store.save(session, durable=True)
    assert not (store.directory / f"{session.id}.json").exists()
    assert (store.finished / f"{session.id}.json").exists()
    assert store.load(session.id) == session
    partial = _record(states.COMPLETED, concat="partial")  # a final concatenation may take it
    store.save(partial, durable=True)
    assert [s.id for s in store.unfinished()] == [partial.id]
    assert {s.id for s in store.all()} == {session.id, partial.id}
    store.delete(session.id)
    assert store.load(session.id) is None


def _counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    reads: list[Path] = []
    read = FileSessionStore._read

    def counted(self: FileSessionStore, path: Path) -> Session | None:
        reads.append(path)
        return read(self, path)

    monkeypatch.setattr(FileSessionStore, "_read", counted)
    return reads


def test_start_up_reads_only_unfinished_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config.load(environ={}, upload_dir=str(tmp_path / "uploads"), writers=1)
    runtime = Runtime(config, Hooks(config))
    runtime.layout.create()
    store = runtime.store
    unfinished = [_record(states.WAITING), _record(states.PAUSED)]
    finished = [_record(s) for s in (states.COMPLETED, states.TERMINATED, states.EXPIRED)]
    for session in unfinished + finished:
        store.save(session, durable=False)
    old_layout = _record(states.COMPLETED)  # written before records were filed apart
    (store.directory / f"{old_layout.id}.json").write_text(json.dumps(old_layout.to_dict()))
    stale = _record(states.COMPLETED)  # a crash came between filing it and unlinking the old
    store.save(stale, durable=False)
    (store.directory / f"{stale.id}.json").write_text(
        json.dumps({**stale.to_dict(), "state": states.WAITING})
    )
    reads = _counting_reads(monkeypatch)
    live = LiveSessions({})
    runtime.directory = LocalDirectory(live, store)

    runtime._recover(live)
    assert sorted(s.id for s in live.all()) == sorted(s.id for s in unfinished)
    assert all(path.parent == store.directory for path in reads)
    assert len(reads) == len(unfinished) + 1  # and the old layout's record, filed once
    assert (store.finished / f"{old_layout.id}.json").exists()
    assert store.load(stale.id) == stale

    reads.clear()
    runtime._recover(LiveSessions({}))
    assert len(reads) == len(unfinished)
