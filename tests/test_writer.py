"""The writer driven through its messages, in this process: no server, no Manager, seconds.

Each test builds a `Writer` over pipes, a `LiveSessions` over a plain dict, the file session store
and local storage in `tmp_path`, sends it what the front end would (`Append`, `Drain`, `Concat`,
a `Nudge` for a command, `Ping`, `Shutdown`) and turns its loop by hand until the answers come.
"""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import queue
import threading
from pathlib import Path
from typing import Any

import pytest

from upload_server.backends import Backends
from upload_server.layout import Layout
from upload_server.sessions import record as states
from upload_server.sessions.live import LiveSessions
from upload_server.sessions.record import Session, new_session_id
from upload_server.sessions.store import FileSessionStore
from upload_server.storage import LocalStorage
from workers.messages import Append, Command, Concat, Drain, Event, Nudge, Ping, Reply, Shutdown
from workers.writer import Writer, WriterSettings

CHUNK = 64 * 1024


class Harness:
    """One writer and what the front end would hold of it."""

    def __init__(
        self,
        tmp_path: Path,
        storage: Any = None,
        fsync: str = "on-complete",
        write_behind: int = 0,
    ) -> None:
        self.layout = Layout(tmp_path / "uploads")
        self.layout.create()
        settings = WriterSettings(
            index=0,
            upload_dir=str(self.layout.root),
            chunk_size=CHUNK,
            max_bytes_per_second=0,
            write_behind=write_behind,
            write_behind_total=write_behind,
            fsync=fsync,
            expiry=0,
            backends=Backends("file", "local"),
        )
        inbox, self.inbox = multiprocessing.Pipe(duplex=False)
        self.replies, replies = multiprocessing.Pipe(duplex=False)
        self.live = LiveSessions({})
        self.store = FileSessionStore(self.layout.sessions)
        self.storage = storage if storage is not None else LocalStorage(self.layout)
        self.writer = Writer(
            settings, inbox, replies, self.live, self.store, self.storage, self.layout
        )
        self.answers: dict[int, Reply] = {}
        self.events: list[Event] = []
        self.ids = iter(range(1, 1_000_000))

    # -- what the front end does --------------------------------------------------------------

    def session(self, protocol: str = states.TUS, total: int | None = None, **fields: Any) -> str:
        state = states.QUEUED if protocol == states.SEED else states.WAITING
        session = Session(
            id=new_session_id(),
            protocol=protocol,
            filename=f"file-{protocol}.bin",
            chunk_size=CHUNK,
            writer=0,
            total_bytes=total,
            state=fields.pop("state", state),
            **fields,
        )
        self.store.save(session, durable=False)
        self.live.put(session)
        return session.id

    def record(self, session_id: str) -> Session:
        session = self.live.get(session_id)
        assert session is not None
        return session

    def append(self, session_id: str, offset: int, data: bytes, **extra: Any) -> int:
        """Spool a request body as its segment and send the `Append`; its request id."""
        segment = self.layout.segment(session_id, offset)
        segment.write_bytes(data)
        request_id = next(self.ids)
        self.inbox.send(Append(request_id, session_id, str(segment), offset, len(data), **extra))
        return request_id

    def command(self, session_id: str, action: str, **args: Any) -> int:
        """Put a command on the session's control queue and nudge the writer. (A `queue.Queue`
        stands for the Manager's queue proxy: it cannot cross a pipe, so the nudge is handed to
        the writer as if it had just taken it from its inbox.)"""
        request_id = next(self.ids)
        control: queue.Queue = queue.Queue()
        control.put(Command(request_id, action, args))
        self.writer.handle(Nudge(session_id, control))
        self._collect()
        return request_id

    def send(self, message: Any) -> None:
        self.inbox.send(message)

    # -- turning the writer -------------------------------------------------------------------

    def turn(self, times: int = 1) -> None:
        for _ in range(times):
            assert self.writer.turn(0)
            self._collect()

    def answer(self, request_id: int, turns: int = 1000) -> Reply:
        for _ in range(turns):
            if request_id in self.answers:
                return self.answers.pop(request_id)
            self.turn()
        raise AssertionError(f"no answer to request {request_id}")

    def settle(self, turns: int = 1000) -> None:
        """Turn until the writer holds no work."""
        for _ in range(turns):
            self.turn()
            idle = not self.writer.tasks and not self.writer.parked
            if idle and not self.writer.inbox.poll(0):
                return
        raise AssertionError("the writer is still busy")

    def kinds(self, session_id: str) -> list[str]:
        return [e.kind for e in self.events if e.session["id"] == session_id]

    def _collect(self) -> None:
        while self.replies.poll(0):
            message = self.replies.recv()
            if isinstance(message, Event):
                self.events.append(message)
            else:
                self.answers[message.request_id] = message

    def data(self, session_id: str) -> bytes:
        return self.layout.partial(session_id).read_bytes()


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def payload(size: int, seed: int = 0) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]


# -- tus append ---------------------------------------------------------------------------------


def test_an_append_is_stored_and_answered(harness: Harness):
    first, rest = payload(3 * CHUNK + 5, 1), payload(CHUNK, 2)
    upload = harness.session(total=len(first) + len(rest))
    reply = harness.answer(harness.append(upload, 0, first))
    assert reply.ok and reply.session["bytes_written"] == len(first)
    assert reply.session["state"] == states.WAITING and reply.session["segments"] == []
    assert harness.data(upload) == first
    assert not harness.layout.segment(upload, 0).exists()
    assert harness.store.load(upload).bytes_written == len(first)

    reply = harness.answer(harness.append(upload, len(first), rest))
    assert reply.ok and reply.session["state"] == states.COMPLETED
    stored = harness.layout.root / reply.session["location"]
    assert stored.read_bytes() == first + rest
    assert reply.session["sha256"] == hashlib.sha256(first + rest).hexdigest()
    assert "completed" in harness.kinds(upload)


@pytest.mark.parametrize(
    ("state", "offset", "code"),
    [
        (states.WAITING, 7, "offset_mismatch"),
        (states.PAUSED, 0, "paused"),
        (states.COMPLETED, 0, "completed"),
        (states.TERMINATED, 0, "terminated"),
    ],
)
def test_an_append_the_rules_refuse_is_answered_by_code(harness: Harness, state, offset, code):
    upload = harness.session(total=100, state=state)
    request_id = harness.append(upload, offset, payload(10))
    reply = harness.answer(request_id)
    assert reply.code == code and reply.message
    assert harness.record(upload).bytes_written == 0
    assert not harness.layout.segment(upload, offset).exists()  # the body is not kept


def test_a_session_the_writer_does_not_know_is_not_found(harness: Harness):
    reply = harness.answer(harness.append("x" * 23, 0, payload(10)))
    assert reply.code == "not_found" and reply.session is None


def test_a_checksum_mismatch_takes_the_bytes_back(harness: Harness):
    first, second = payload(CHUNK + 3, 3), payload(2 * CHUNK, 4)
    upload = harness.session(total=len(first) + len(second))
    assert harness.answer(harness.append(upload, 0, first)).ok
    wrong = hashlib.sha1(b"something else").digest()
    reply = harness.answer(harness.append(upload, len(first), second, checksum=("sha1", wrong)))
    assert reply.code == "checksum_mismatch"
    assert reply.session["bytes_written"] == len(first)
    assert harness.data(upload) == first
    right = hashlib.sha1(second).digest()
    reply = harness.answer(harness.append(upload, len(first), second, checksum=("sha1", right)))
    assert reply.ok and reply.session["state"] == states.COMPLETED
    # the running SHA-256 was restored with the bytes: the digest is of the file as stored
    assert reply.session["sha256"] == hashlib.sha256(first + second).hexdigest()


def test_a_checksum_mismatch_does_not_declare_a_deferred_length(harness: Harness):
    upload = harness.session()
    wrong = ("md5", hashlib.md5(b"x").digest())
    reply = harness.answer(harness.append(upload, 0, b"abc", checksum=wrong, declare_length=10))
    assert reply.code == "checksum_mismatch" and reply.session["total_bytes"] is None
    reply = harness.answer(harness.append(upload, 0, b"abc", declare_length=3))
    assert reply.ok and reply.session["state"] == states.COMPLETED


def test_terminate_interrupts_an_append_in_progress(harness: Harness):
    data = payload(8 * CHUNK, 5)
    upload = harness.session(total=len(data))
    append = harness.append(upload, 0, data)
    harness.turn(3)  # the segment is named and a few chunks are copied
    assert append not in harness.answers
    command = harness.command(upload, "terminate")
    assert harness.answer(append).code == "terminated"
    reply = harness.answer(command)
    assert reply.ok and reply.session["state"] == states.TERMINATED
    assert not harness.layout.partial(upload).exists()
    assert not list(harness.layout.spool_dir.glob(f"{upload}.*"))
    assert "terminated" in harness.kinds(upload)


def test_pause_mid_append_keeps_the_body_and_resume_drains_it(harness: Harness):
    data = payload(8 * CHUNK, 6)
    upload = harness.session(total=len(data) + 1)
    append = harness.append(upload, 0, data)
    harness.turn(3)
    pause = harness.command(upload, "pause")
    refused = harness.answer(append)
    assert refused.code == "paused"
    # the body was named in the record before its copy began: it counts, and stays spooled
    assert refused.session["bytes_written"] == len(data)
    assert refused.session["segments"] == [[0, len(data)]]
    assert harness.layout.segment(upload, 0).exists()
    assert harness.answer(pause).session["state"] == states.PAUSED
    assert harness.store.load(upload).segments == [[0, len(data)]]

    resume = harness.command(upload, "resume")
    assert harness.answer(resume).ok
    harness.settle()
    record = harness.record(upload)
    assert record.segments == [] and record.bytes_written == len(data)
    assert record.state == states.WAITING
    assert harness.data(upload) == data
    assert not harness.layout.segment(upload, 0).exists()


def _second_append(
    tmp_path: Path, write_behind: int, chunks: int, seed: int
) -> tuple[Harness, str, bytes, bytes, int]:
    """An upload whose first chunk is stored, and the request id of a second append of
    `chunks` chunks, sent but not yet run (the upload needs one more byte to complete)."""
    harness = Harness(tmp_path, write_behind=write_behind)
    first, second = payload(CHUNK, seed), payload(chunks * CHUNK, seed + 1)
    upload = harness.session(total=len(first) + len(second) + 1)
    assert harness.answer(harness.append(upload, 0, first)).ok
    harness.settle()
    return harness, upload, first, second, harness.append(upload, CHUNK, second)


def test_write_behind_answers_once_the_segment_is_named_and_copies_after(tmp_path: Path):
    harness, upload, first, second, request = _second_append(tmp_path, 64 * CHUNK, 6, 20)
    harness.turn()  # one step: the segment is named, and the answer goes out at once
    reply = harness.answers.pop(request)
    assert reply.ok and reply.session["bytes_written"] == CHUNK + len(second)
    assert reply.session["segments"] == [[CHUNK, len(second)]]
    assert harness.store.load(upload).segments == [[CHUNK, len(second)]]  # durable: it counts
    assert len(harness.data(upload)) < CHUNK + len(second)  # not copied yet
    harness.settle()
    record = harness.store.load(upload)
    assert record.segments == [] and record.bytes_written == CHUNK + len(second)
    assert harness.data(upload) == first + second
    assert not harness.layout.segment(upload, CHUNK).exists()


def test_write_behind_waits_while_more_than_its_budget_is_behind(tmp_path: Path):
    harness, upload, first, second, request = _second_append(tmp_path, 2 * CHUNK, 5, 22)
    harness.turn(2)
    assert request not in harness.answers  # 5 chunks behind, 2 allowed
    reply = harness.answer(request)
    # answered as soon as no more than 2 chunks were left to copy
    assert reply.ok and len(harness.data(upload)) - CHUNK >= 3 * CHUNK
    harness.settle()
    assert harness.data(upload) == first + second


def test_appends_that_wait_for_the_copying_one_are_parked_and_answered_by_it(tmp_path: Path):
    """While one task copies an upload's named segments, the next PATCH's task does not take
    turns of the loop to wait (that cost grew with every PATCH of a long stream): it is parked,
    answered by the copying task as its copying makes room, and then ends."""
    harness = Harness(tmp_path, write_behind=2 * CHUNK)
    first, second, third = payload(CHUNK, 30), payload(4 * CHUNK, 31), payload(4 * CHUNK, 32)
    upload = harness.session(total=9 * CHUNK + 1)
    assert harness.answer(harness.append(upload, 0, first)).ok
    harness.settle()
    # answered once no more than 2 chunks are behind, while its task still copies
    assert harness.answer(harness.append(upload, CHUNK, second)).ok
    waiting = harness.append(upload, CHUNK + len(second), third)
    harness.turn(2)  # the copying task's step, then the new one's: named, not answered, parked
    assert waiting not in harness.answers  # 5 chunks behind, 2 allowed
    assert [t.request_id for t in harness.writer.parked[upload]] == [waiting]
    assert len(harness.writer.tasks) == 1  # only the copying task takes turns
    reply = harness.answer(waiting)  # by the copying task, as its copying made room
    assert reply.ok and reply.session["bytes_written"] == CHUNK + len(second) + len(third)
    harness.turn(2)
    assert not harness.writer.parked and len(harness.writer.tasks) == 1  # answered: it ended
    # the last byte: its append waits, parked, for the copy, then completes the upload
    last = harness.append(upload, 9 * CHUNK, b"z")
    harness.turn(2)
    assert [t.request_id for t in harness.writer.parked[upload]] == [last]
    reply = harness.answer(last)
    assert reply.ok and reply.session["state"] == states.COMPLETED
    assert not harness.writer.parked and not harness.writer.tasks
    everything = first + second + third + b"z"
    assert reply.session["sha256"] == hashlib.sha256(everything).hexdigest()
    assert (harness.layout.root / reply.session["location"]).read_bytes() == everything
    assert harness.kinds(upload).count("completed") == 1


def test_the_append_that_completes_an_upload_is_answered_after_completion(tmp_path: Path):
    harness = Harness(tmp_path, write_behind=64 * CHUNK)
    first, last = payload(CHUNK, 24), payload(4 * CHUNK, 25)
    upload = harness.session(total=len(first) + len(last))
    assert harness.answer(harness.append(upload, 0, first)).ok
    reply = harness.answer(harness.append(upload, CHUNK, last))
    assert reply.ok and reply.session["state"] == states.COMPLETED
    assert reply.session["sha256"] == hashlib.sha256(first + last).hexdigest()
    assert (harness.layout.root / reply.session["location"]).read_bytes() == first + last
    assert harness.kinds(upload).count("completed") == 1


def test_an_uploads_first_segment_becomes_its_data_without_a_copy(harness: Harness):
    data = payload(3 * CHUNK, 26)
    upload = harness.session(total=len(data) + 1)
    request = harness.append(upload, 0, data)
    segment_inode = harness.layout.segment(upload, 0).stat().st_ino
    assert harness.answer(request).ok
    harness.settle()
    assert harness.layout.partial(upload).stat().st_ino == segment_inode  # renamed, not copied
    assert harness.data(upload) == data
    assert harness.store.load(upload).segments == []


class FullDisk(LocalStorage):
    """Local storage on a disk with room for `room` more data writes (from memory or from a
    file; None: no limit): the next one finds it full."""

    def __init__(self, layout: Layout, room: int | None) -> None:
        super().__init__(layout)
        self.room = room

    def open(self, session_id: str) -> Any:
        return _Filling(super().open(session_id), self)


class _Filling:
    def __init__(self, data: Any, disk: FullDisk) -> None:
        self._data, self._disk = data, disk

    def write(self, view: memoryview, offset: int) -> None:
        self._use()
        self._data.write(view, offset)

    def write_from(self, src_fd: int, src_offset: int, length: int, offset: int) -> None:
        self._use()
        self._data.write_from(src_fd, src_offset, length, offset)

    def _use(self) -> None:
        if self._disk.room is not None:
            if self._disk.room <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            self._disk.room -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)


def test_a_full_disk_fails_the_append_and_counts_nothing_past_the_data(tmp_path: Path):
    layout = Layout(tmp_path / "uploads")
    harness = Harness(tmp_path, storage=FullDisk(layout, room=1))
    first = payload(CHUNK, 7)
    upload = harness.session(total=10 * CHUNK)
    assert harness.answer(harness.append(upload, 0, first)).ok  # adopted: no write
    reply = harness.answer(harness.append(upload, CHUNK, payload(4 * CHUNK, 8)))
    assert reply.code == "disk_full"
    assert reply.session["state"] == states.FAILED
    assert reply.session["bytes_written"] == CHUNK and reply.session["segments"] == []
    assert harness.store.load(upload).bytes_written == CHUNK
    assert harness.data(upload) == first
    assert not harness.layout.segment(upload, CHUNK).exists()
    assert "failed" in harness.kinds(upload)


def test_a_full_disk_keeps_the_bytes_write_behind_answered(tmp_path: Path):
    """A client told its bytes are stored (answered before the copy) never loses them: the
    disk fills during the copy, the segment stays named and counted, and is copied when the
    upload goes on."""
    disk = FullDisk(Layout(tmp_path / "uploads"), room=2)
    harness = Harness(tmp_path, storage=disk, write_behind=64 * CHUNK)
    first, second, last = payload(CHUNK, 40), payload(4 * CHUNK, 41), payload(CHUNK, 42)
    upload = harness.session(total=6 * CHUNK)
    assert harness.answer(harness.append(upload, 0, first)).ok
    harness.settle()
    told = harness.answer(harness.append(upload, CHUNK, second))
    assert told.ok and told.session["bytes_written"] == 5 * CHUNK
    harness.settle()  # the copy meets the full disk at its third chunk
    record = harness.record(upload)
    assert record.state == states.FAILED and record.error["code"] == "disk_full"
    assert record.bytes_written == 5 * CHUNK and record.segments == [[CHUNK, 4 * CHUNK]]
    assert harness.store.load(upload).bytes_written == 5 * CHUNK
    assert harness.layout.segment(upload, CHUNK).read_bytes() == second
    assert harness.data(upload) == first
    assert "failed" in harness.kinds(upload)

    disk.room = None  # space again: the client sends on from the offset it was told
    reply = harness.answer(harness.append(upload, 5 * CHUNK, last))
    assert reply.ok and reply.session["state"] == states.COMPLETED
    whole = first + second + last
    assert (harness.layout.root / reply.session["location"]).read_bytes() == whole
    assert reply.session["sha256"] == hashlib.sha256(whole).hexdigest()


# -- seed drain ---------------------------------------------------------------------------------


def test_a_seed_drain_completes_with_its_digest(harness: Harness):
    data = payload(5 * CHUNK + 11, 9)
    upload = harness.session(states.SEED, total=len(data))
    harness.layout.spool(upload).write_bytes(data)
    harness.send(Drain(upload))
    harness.settle()
    record = harness.record(upload)
    assert record.state == states.COMPLETED
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    assert (harness.layout.root / record.location).read_bytes() == data
    assert not harness.layout.spool(upload).exists()
    assert harness.kinds(upload)[-1] == "completed"
    assert harness.store.load(upload).state == states.COMPLETED


def test_a_digest_mismatch_fails_and_removes_the_file(harness: Harness):
    data = payload(3 * CHUNK, 10)
    upload = harness.session(states.SEED, total=len(data), expected_sha256="0" * 64)
    harness.layout.spool(upload).write_bytes(data)
    harness.send(Drain(upload))
    harness.settle()
    record = harness.record(upload)
    assert record.state == states.FAILED and record.error["code"] == "digest_mismatch"
    assert record.location is None
    assert not harness.layout.partial(upload).exists()
    assert [p.name for p in harness.layout.root.iterdir() if p.is_file()] == []
    assert harness.kinds(upload)[-1] == "failed"


# -- concatenation, ping, shutdown --------------------------------------------------------------


def test_concatenation_builds_the_final_upload(harness: Harness):
    parts = [payload(2 * CHUNK + 1, 11), payload(CHUNK - 1, 12)]
    ids = []
    for data in parts:
        part = harness.session(total=len(data), concat="partial")
        assert harness.answer(harness.append(part, 0, data)).session["state"] == "completed"
        ids.append(part)
    final = harness.session(concat="final", parts=ids)
    request_id = next(harness.ids)
    harness.send(Concat(request_id, final, tuple(ids)))
    reply = harness.answer(request_id)
    assert reply.ok and reply.session["state"] == states.COMPLETED
    whole = b"".join(parts)
    assert (harness.layout.root / reply.session["location"]).read_bytes() == whole
    assert reply.session["sha256"] == hashlib.sha256(whole).hexdigest()


def test_ping_and_shutdown(harness: Harness):
    upload = harness.session(total=3 * CHUNK)
    assert harness.answer(harness.append(upload, 0, payload(CHUNK))).ok
    harness.send(Ping(99))
    assert harness.answer(99).ok
    loop = threading.Thread(target=harness.writer.serve)
    loop.start()
    harness.send(Shutdown())
    loop.join(5)
    assert not loop.is_alive()
    assert harness.store.load(upload).bytes_written == CHUNK
