"""The session rules alone: every state by every command, in-process (no server, no writer).

The expected answers are written out as a table, so a change of rule shows up here as a changed
row, and the HTTP status each refusal becomes is checked against `api/refusals` for each protocol.
"""

from __future__ import annotations

import itertools

import pytest

from upload_server.api import openapi, refusals
from upload_server.config import Config
from upload_server.sessions import lifecycle
from upload_server.sessions import record as states
from upload_server.sessions.lifecycle import Refusal
from upload_server.sessions.record import Session

OK = None
FINAL = "final"  # refused with the state's own name

# command -> state -> expected refusal code (OK: allowed), for a seed and a tus session
COMMANDS: dict[tuple[str, bool], dict[str, str | None]] = {
    (lifecycle.PAUSE, False): {
        states.QUEUED: OK,
        states.WRITING: OK,
        states.WAITING: OK,
        states.PAUSED: OK,
        states.FAILED: OK,
        states.COMPLETED: "completed",
        states.TERMINATED: FINAL,
        states.EXPIRED: FINAL,
    },
    (lifecycle.RESUME, False): {
        states.QUEUED: "not_paused",
        states.WRITING: "not_paused",
        states.WAITING: "seed-only",  # a seed upload waiting for its file again resumes
        states.PAUSED: OK,
        states.FAILED: OK,
        states.COMPLETED: "completed",
        states.TERMINATED: FINAL,
        states.EXPIRED: FINAL,
    },
    (lifecycle.TERMINATE, False): {
        states.QUEUED: OK,
        states.WRITING: OK,
        states.WAITING: OK,
        states.PAUSED: OK,
        states.FAILED: OK,
        states.COMPLETED: "completed",
        states.TERMINATED: FINAL,
        states.EXPIRED: FINAL,
    },
    (lifecycle.TERMINATE, True): {  # tus DELETE: a completed upload goes too
        states.QUEUED: OK,
        states.WRITING: OK,
        states.WAITING: OK,
        states.PAUSED: OK,
        states.FAILED: OK,
        states.COMPLETED: OK,
        states.TERMINATED: FINAL,
        states.EXPIRED: FINAL,
    },
    (lifecycle.EXPIRE, False): {
        states.QUEUED: OK,
        states.WRITING: OK,
        states.WAITING: OK,
        states.PAUSED: OK,
        states.FAILED: OK,
        states.COMPLETED: "completed",
        states.TERMINATED: FINAL,
        states.EXPIRED: FINAL,
    },
}


def session(state: str, protocol: str = states.TUS, **fields) -> Session:
    values = {"total_bytes": 100, "bytes_written": 40, **fields}
    return Session(
        id="s" * 22, protocol=protocol, filename="f", chunk_size=10, writer=0, state=state, **values
    )


def refusal_of(call) -> str | None:
    try:
        call()
    except Refusal as exc:
        return exc.code
    return None


def test_the_table_covers_every_state_and_command():
    assert {command for command, _ in COMMANDS} == set(lifecycle.COMMANDS)
    for row in COMMANDS.values():
        assert set(row) == set(states.STATES)


@pytest.mark.parametrize(
    ("command", "completed_too", "state", "protocol"),
    [
        (command, completed_too, state, protocol)
        for (command, completed_too), row in COMMANDS.items()
        for state in row
        for protocol in (states.SEED, states.TUS)
    ],
)
def test_every_state_and_command(command, completed_too, state, protocol):
    expected = COMMANDS[(command, completed_too)][state]
    if expected == FINAL:
        expected = state
    elif expected == "seed-only":
        expected = OK if protocol == states.SEED else "not_paused"
    s = session(state, protocol)
    got = refusal_of(lambda: lifecycle.check_command(s, command, completed_too=completed_too))
    assert got == expected


def test_an_unknown_command_is_refused():
    assert refusal_of(lambda: lifecycle.check_command(session(states.WAITING), "explode")) == (
        "bad_command"
    )


APPEND_BY_STATE = {
    states.QUEUED: OK,
    states.WRITING: OK,
    states.WAITING: OK,
    states.FAILED: OK,
    states.PAUSED: "paused",
    states.COMPLETED: "completed",
    states.TERMINATED: "terminated",
    states.EXPIRED: "expired",
}


@pytest.mark.parametrize("state", states.STATES)
def test_append_by_state(state):
    s = session(state)
    assert refusal_of(lambda: lifecycle.check_append(s, 40, 10)) == APPEND_BY_STATE[state]


def test_a_paused_refusal_carries_the_offset():
    with pytest.raises(Refusal) as caught:
        lifecycle.check_append(session(states.PAUSED), 40, 10)
    assert caught.value.offset == 40


@pytest.mark.parametrize(
    ("fields", "offset", "length", "declared", "expected"),
    [
        ({}, 40, 60, None, OK),  # to the last byte
        ({}, 39, 10, None, "offset_mismatch"),
        ({}, 41, 10, None, "offset_mismatch"),
        ({}, 40, 61, None, "exceeds_length"),
        ({"total_bytes": None}, 40, 10, 50, OK),  # a deferred length declared
        ({"total_bytes": None}, 40, 10, 49, "bad_header"),  # shorter than the data sent
        ({}, 40, 10, 120, "length_set"),
        ({}, 40, 10, 100, OK),  # the same length again
        ({"total_bytes": None}, 40, 10, 10**9, "upload_too_large"),
        ({"total_bytes": None}, 40, 10**9, None, "upload_too_large"),
        ({"protocol": states.SEED}, 40, 10, None, "seed_session"),
        ({"concat": "final"}, 40, 10, None, "final_upload"),
    ],
)
def test_append_rules(fields, offset, length, declared, expected):
    protocol = fields.pop("protocol", states.TUS)
    s = session(states.WAITING, protocol, **fields)
    check = lambda: lifecycle.check_append(  # noqa: E731
        s, offset, length, declared=declared, max_size=1000
    )
    assert refusal_of(check) == expected


def test_an_empty_append_at_the_end_of_a_completed_upload_is_a_repeat():
    done = session(states.COMPLETED, bytes_written=100)
    assert lifecycle.is_repeat_of_last_append(done, 100, 0)
    assert not lifecycle.is_repeat_of_last_append(done, 100, 1)
    assert not lifecycle.is_repeat_of_last_append(done, 99, 0)
    assert not lifecycle.is_repeat_of_last_append(session(states.WAITING), 40, 0)


def test_the_writer_skips_the_size_limit_it_does_not_know():
    s = session(states.WAITING, total_bytes=None)
    assert refusal_of(lambda: lifecycle.check_append(s, 40, 10**9)) is None


def test_transitions():
    s = session(states.WRITING)
    lifecycle.pause(s)
    assert s.state == states.PAUSED
    s.set_error("io_error", "x")
    assert lifecycle.resume(s) is False and s.state == states.WAITING and s.error is None
    s.segments = [[40, 10]]
    lifecycle.pause(s)
    assert lifecycle.resume(s) is True  # counted segments are copied by the writer on its own
    seed = session(states.PAUSED, states.SEED)
    assert lifecycle.resume(seed) is True and seed.state == states.QUEUED
    lifecycle.end(s, lifecycle.TERMINATE)
    assert s.state == states.TERMINATED and s.is_final
    lifecycle.end(seed, lifecycle.EXPIRE)
    assert seed.state == states.EXPIRED


def test_completion_and_waiting():
    s = session(states.WRITING, bytes_written=100, publishing="f.bin", expires_at=5.0)
    assert lifecycle.is_whole(s)
    lifecycle.complete(s, "f.bin")
    assert (s.state, s.location, s.publishing, s.expires_at) == (
        states.COMPLETED,
        "f.bin",
        None,
        None,
    )
    assert not lifecycle.is_whole(session(states.WAITING, total_bytes=None))
    seed = session(states.WRITING, states.SEED)
    lifecycle.wait_for_client(seed, "the server restarted")
    assert seed.state == states.WAITING and seed.error["code"] == "spool_missing"
    tus = session(states.WRITING)
    lifecycle.wait_for_client(tus, "the server restarted")
    assert tus.state == states.WAITING and tus.error is None
    lifecycle.fail(tus, "disk_full", "full")
    assert tus.state == states.FAILED and tus.error["code"] == "disk_full"


def test_a_whole_upload_whose_completion_failed_is_completed_again():
    """Its offset equals its length, which a tus client takes for done: HEAD completes it
    again (`completion_failed`), and a resume has its writer complete it by itself."""
    whole = session(states.FAILED, bytes_written=100)
    assert lifecycle.completion_failed(whole)
    assert not lifecycle.completion_failed(session(states.FAILED, bytes_written=40))
    assert not lifecycle.completion_failed(session(states.PAUSED, bytes_written=100))
    assert not lifecycle.completion_failed(session(states.FAILED, states.IETF, bytes_written=100))
    final = session(states.FAILED, bytes_written=100, concat="final")
    assert not lifecycle.completion_failed(final)
    assert lifecycle.resume(whole) is True and whole.state == states.WAITING
    assert lifecycle.completion_failed(whole)  # until its writer has completed it


# -- the HTTP table -------------------------------------------------------------------------------

EVERY_CODE = sorted(
    {
        *(code for row in COMMANDS.values() for code in row.values() if code not in (OK, FINAL)),
        *states.STATES,
        "offset_mismatch",
        "exceeds_length",
        "upload_too_large",
        "length_set",
        "bad_header",
        "seed_session",
        "final_upload",
        "bad_command",
    }
    - {"seed-only", states.QUEUED, states.WRITING, states.WAITING, states.FAILED}
)


@pytest.mark.parametrize(("code", "protocol"), list(itertools.product(EVERY_CODE, ["seed", "tus"])))
def test_every_refusal_has_a_client_error_status(code, protocol):
    """A rule's refusal is the client's to act on: a 4xx (tus's 460 included), never a 500."""
    assert code in refusals.STATUS
    assert 400 <= refusals.status_of(code, protocol) < 500


@pytest.mark.parametrize(
    ("code", "protocol", "status"),
    [
        ("paused", "tus", 423),  # tus clients retry a 423
        ("paused", "seed", 409),
        ("terminated", "tus", 410),
        ("terminated", "seed", 409),
        ("completed", "tus", 409),
        ("offset_mismatch", "tus", 409),
        ("exceeds_length", "tus", 413),
        ("final_upload", "tus", 403),
        ("checksum_mismatch", "tus", 460),
        ("disk_full", "tus", 507),
        ("storage_unavailable", "tus", 503),
        ("io_error", "seed", 500),
    ],
)
def test_status_by_protocol(code, protocol, status):
    assert refusals.status_of(code, protocol) == status


def test_a_tus_refusal_tells_the_offset_in_a_header_too():
    error = refusals.http_error(Refusal("paused", "paused", offset=7), "tus")
    assert (error.status, error.extra, error.headers["Upload-Offset"]) == (423, {"offset": 7}, "7")
    seed = refusals.http_error(Refusal("paused", "paused", offset=7), "seed")
    assert "Upload-Offset" not in seed.headers and seed.extra == {"offset": 7}


def test_the_openapi_document_names_the_codes_of_each_status():
    document = openapi.document(Config.load())
    patch = document["paths"]["/files/{upload_id}"]["patch"]["responses"]
    assert "paused" in patch["423"]["description"]
    assert "offset_mismatch" in patch["409"]["description"]
    pause = document["paths"]["/upload/pause"]["get"]["responses"]
    assert "paused" in pause["409"]["description"]  # the seed API's column of the table


@pytest.mark.parametrize("state", states.STATES)
def test_only_a_session_waiting_for_its_client_expires(state):
    due = session(state, expires_at=10.0)
    expected = state in (states.WAITING, states.PAUSED, states.FAILED)
    assert lifecycle.is_due_to_expire(due, now=11.0) is expected
    assert not lifecycle.is_due_to_expire(due, now=9.0)
    assert not lifecycle.is_due_to_expire(session(state, expires_at=None), now=11.0)
