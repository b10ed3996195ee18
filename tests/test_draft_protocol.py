"""The IETF draft's header formats and version differences (`protocol/draft.py`) and its session
rules (`lifecycle.draft_length`, `awaits_completion`), in-process."""

from __future__ import annotations

import pytest

from upload_server.protocol import draft
from upload_server.sessions import lifecycle
from upload_server.sessions import record as states
from upload_server.sessions.record import Session

pytestmark = pytest.mark.frontend  # the draft's protocol: how writers start does not change it


def headers(**values: str):
    named = {name.replace("_", "-").lower(): value for name, value in values.items()}
    return lambda name: named.get(name.lower())


@pytest.mark.parametrize(
    ("value", "expected"), [("?1", True), ("?0", False), (" ?1;a=b", True), (None, None)]
)
def test_structured_booleans(value, expected):
    assert draft.parse_boolean("Upload-Complete", value) is expected


@pytest.mark.parametrize("value", ["1", "true", "?2", "", "?"])
def test_malformed_booleans(value):
    with pytest.raises(draft.DraftHeaderError):
        draft.parse_boolean("Upload-Complete", value)


@pytest.mark.parametrize("value", ["-1", "1.5", "x", "1234567890123456", ""])
def test_malformed_integers(value):
    with pytest.raises(draft.DraftHeaderError):
        draft.parse_integer("Upload-Offset", value)


def test_versions_and_their_differences():
    assert draft.dialect("8").append_type == draft.PARTIAL_UPLOAD
    assert draft.dialect("6").age_key == "expires"
    assert draft.dialect("5").append_type is None and not draft.dialect("5").limits
    old = draft.dialect("3")
    assert old.completeness(False) == ("Upload-Incomplete", "?1")
    assert draft.parse_complete(old, headers()) is True  # absent: complete
    assert draft.parse_complete(old, headers(upload_incomplete="?1")) is False
    assert draft.parse_complete(draft.dialect("8"), headers()) is None
    assert draft.dialect("5").problem_type(draft.MISMATCHING_OFFSET) == "about:blank"
    for value, code in ((None, "missing_interop_version"), ("2", "unsupported_interop_version")):
        with pytest.raises(draft.DraftHeaderError) as raised:
            draft.dialect(value)
        assert raised.value.code == code


def test_telling_the_draft_from_tus():
    assert draft.speaks_draft(headers(upload_complete="?0"))
    assert draft.speaks_draft(headers(upload_draft_interop_version="8"))
    assert not draft.speaks_draft(headers(tus_resumable="1.0.0", upload_complete="?0"))
    assert not draft.speaks_draft(headers(upload_length="5"))


def test_upload_limit_and_digests_and_filenames():
    limit = draft.upload_limit(draft.dialect("8"), max_size=10, max_append=5, max_age=60)
    assert limit == "max-size=10, min-size=0, max-append-size=5, max-age=60"
    assert draft.upload_limit(draft.dialect("5"), max_size=1, max_append=1, max_age=None) is None
    assert draft.known_digest("Content-Digest", "md5=:AAAA:, sha-256=:AAAA:") == (
        "sha256",
        b"\0\0\0",
    )
    assert draft.known_digest("Content-Digest", "unixsum=:AAAA:") is None
    with pytest.raises(draft.DraftHeaderError):
        draft.parse_digests("Repr-Digest", "sha-256=abc")
    assert draft.disposition_filename('inline; filename="a \\"b\\".txt"') == 'a "b".txt'
    assert draft.disposition_filename("attachment; filename*=UTF-8''%E2%82%AC.txt") == "€.txt"
    assert draft.disposition_filename("inline") is None


def session(**fields) -> Session:
    values = dict(id="s" * 22, protocol=states.IETF, filename="f", chunk_size=1, writer=0)
    return Session(**{**values, **fields})


def test_draft_length_rules():
    s = session(announced_length=10, bytes_written=4)
    assert lifecycle.draft_length(s, 4, 3, complete=False, announced=None) is None
    assert lifecycle.draft_length(s, 4, 6, complete=True, announced=10) == 10
    for offset, length, complete, announced in ((4, 7, False, None), (4, 3, True, None)):
        with pytest.raises(lifecycle.Refusal) as refused:
            lifecycle.draft_length(s, offset, length, complete=complete, announced=announced)
        assert refused.value.code == lifecycle.INCONSISTENT_LENGTH
    with pytest.raises(lifecycle.Refusal):
        lifecycle.draft_length(s, 4, 0, complete=False, announced=11)
    unknown = session(bytes_written=4)
    assert lifecycle.draft_length(unknown, 4, 5, complete=True, announced=None) == 9


def test_a_whole_draft_upload_awaits_its_completion():
    whole = session(announced_length=4, bytes_written=4, state=states.WAITING)
    assert lifecycle.awaits_completion(whole) and not lifecycle.is_whole(whole)
    assert not lifecycle.awaits_completion(session(announced_length=4, bytes_written=3))
    lifecycle.check_writable(whole)  # a draft upload takes appends like a tus one


def test_a_draft_upload_whose_state_was_lost_is_deactivated():
    """'the offset MUST NOT decrease. If the server loses any part of the state, it MUST
    deactivate the upload resource and reject further interaction with it.'"""
    from upload_server.sessions import segments

    lost = session(bytes_written=10, state=states.WAITING)
    segments.reconcile(lost, 6, lambda offset: None)
    assert lifecycle.is_deactivated(lost)
    with pytest.raises(lifecycle.Refusal) as refused:
        lifecycle.check_writable(lost)
    assert refused.value.code == lifecycle.STATE_LOST
    with pytest.raises(lifecycle.Refusal):
        lifecycle.check_command(lost, lifecycle.RESUME)
    lifecycle.check_command(lost, lifecycle.TERMINATE)
    tus = session(protocol=states.TUS, bytes_written=10, state=states.WAITING)
    segments.reconcile(tus, 6, lambda offset: None)
    assert tus.bytes_written == 6 and tus.state == states.WAITING
