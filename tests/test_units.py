"""Fine-grained checks of the pure parts: filenames, multipart parsing, settings."""

from __future__ import annotations

import io
import multiprocessing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upload_server import errors
from upload_server.config import Config
from upload_server.config_values import parse_duration, parse_size
from upload_server.filenames import MAX_NAME_BYTES, candidates, sanitize
from upload_server.protocol import multipart
from upload_server.received_body import RequestBody
from upload_server.session_limits import SessionLimits
from upload_server.sessions import segments
from upload_server.sessions.live import LiveSessions
from upload_server.sessions.record import Session, new_session_id
from upload_server.sessions.versions import Counters, RecordCache, new_counters


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\photo.jpg", "photo.jpg"),
        ("CON", "_CON"),
        ("com1.txt", "_com1.txt"),
        ("lpt9", "_lpt9"),
        ("a<b>c:d|e?f*g.txt", "a_b_c_d_e_f_g.txt"),
        ("  spaced.txt  ", "spaced.txt"),
        ("trailing.dots...", "trailing.dots"),
        (".bashrc", "bashrc"),
        ("...", "upload"),
        ("", "upload"),
        (None, "upload"),
        ("nul\x00byte", "nul_byte"),
        ("tab\there", "tab_here"),
        ("日本語.txt", "日本語.txt"),
        ("résumé.pdf", "résumé.pdf"),
        ("invoice\u202efdp.exe", "invoice_fdp.exe"),  # shown as "invoiceexe.pdf"
        ("\u2067a\u2069\u200f\u200e\u061c.txt", "_a____.txt"),
        ("\u202a\u202b\u202c\u202d\u2066\u2068x", "______x"),
        ("c1\x80\x85\x9f.txt", "c1___.txt"),
        ("del\x7f.txt", "del_.txt"),
        ("line\u2028para\u2029.txt", "line_para_.txt"),
        ("bad\ufffdbyte.txt", "bad_byte.txt"),
    ],
)
def test_sanitize(raw, expected):
    assert sanitize(raw) == expected


def test_sanitize_keeps_the_extension_of_long_names():
    name = sanitize("é" * 300 + ".tar.gz")
    assert len(name.encode()) <= MAX_NAME_BYTES
    assert name.endswith(".gz")


@given(st.text())
@settings(max_examples=500)
def test_sanitize_always_gives_one_safe_component(raw):
    name = sanitize(raw)
    assert name and not name.startswith(".")
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert not any(0x80 <= ord(c) <= 0x9F or c in "\u202e\u2066\u200f\ufffd" for c in name)
    assert name not in (".", "..")
    assert len(name.encode()) <= MAX_NAME_BYTES


def test_candidates_never_repeat():
    names = [name for (_, name), _ in zip(candidates("a.txt"), range(4), strict=False)]
    assert names == ["a.txt", "a (1).txt", "a (2).txt", "a (3).txt"]
    assert next(candidates("a.txt", 7)) == (7, "a (7).txt")


def _body(data: bytes) -> RequestBody:
    return RequestBody(io.BytesIO(data), len(data), None, limit=10**9)  # type: ignore[arg-type]


def _form(*parts: tuple[str, str | None, bytes], boundary: str = "XyZ") -> bytes:
    out = b"preamble\r\n"
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += content + b"\r\n"
    return out + f"--{boundary}--\r\nepilogue".encode()


def test_multipart_locates_parts():
    data = _form(("field", None, b"value"), ("file", "a.bin", b"\r\n--Xy\r\n" * 3))
    body = _body(data)
    parts = multipart.parse(body, "XyZ")
    assert [p.name for p in parts] == ["field", "file"]
    assert body.read(parts[0].start, parts[0].end) == b"value"
    assert parts[1].filename == "a.bin"
    assert body.read(parts[1].start, parts[1].end) == b"\r\n--Xy\r\n" * 3


def test_multipart_filename_with_invalid_utf8_bytes():
    data = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="caf\xe9 \x80\xff.txt"'
        b"\r\n\r\nabc\r\n--b--\r\n"
    )
    parts = multipart.parse(_body(data), "b")
    assert parts[0].filename == "caf\ufffd \ufffd\ufffd.txt"  # each invalid byte replaced
    assert sanitize(parts[0].filename) == "caf_ __.txt"


def test_multipart_extended_filename():
    data = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"; '
        b"filename*=UTF-8''%E2%82%AC%20rates.txt\r\n\r\nabc\r\n--b--\r\n"
    )
    parts = multipart.parse(_body(data), "b")
    assert parts[0].filename == "€ rates.txt"


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "no multipart boundary"),
        (b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nabc', "closing boundary"),
        (b"--b\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\nabc\r\n--b--", "exceed"),
        (b"--b\r\nbroken header line\r\n\r\nabc\r\n--b--", "malformed part header"),
        (b"--b\r\nContent-Disposition: attachment\r\n\r\nabc\r\n--b--", "not form-data"),
        (b"--b" + b"x" * 300, "delimiter"),
    ],
)
def test_multipart_rejects_malformed_bodies(data, message):
    with pytest.raises(multipart.MultipartError, match=message):
        multipart.parse(_body(data), "b")


def test_multipart_limits_the_number_of_parts():
    data = _form(*[("f", None, b"x")] * (multipart.MAX_PARTS + 1))
    with pytest.raises(multipart.MultipartError, match="more than"):
        multipart.parse(_body(data), "XyZ")


@given(st.binary(max_size=2000))
@settings(max_examples=300)
def test_multipart_never_crashes_on_garbage(data):
    try:
        parts = multipart.parse(_body(b"--b\r\n" + data), "b")
    except multipart.MultipartError:
        return
    for part in parts:
        assert 0 <= part.start <= part.end <= len(data) + 5


@pytest.mark.parametrize(
    "value,expected",
    [
        ("multipart/form-data; boundary=abc", "abc"),
        ('multipart/form-data; boundary="a b c"', "a b c"),
        ("Multipart/Form-Data;boundary=X", "X"),
    ],
)
def test_boundary_of(value, expected):
    assert multipart.boundary_of(value) == expected


@pytest.mark.parametrize(
    "value",
    [None, "", "text/plain", "multipart/form-data", "multipart/form-data; boundary=" + "x" * 71],
)
def test_boundary_of_rejects(value):
    with pytest.raises(multipart.MultipartError):
        multipart.boundary_of(value)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1048576", 1048576),
        ("1MiB", 1048576),
        ("1mb", 1000000),
        ("512KiB", 524288),
        ("2GiB", 2 * 1024**3),
        ("1.5KiB", 1536),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1", "1 parsec"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_duration():
    assert parse_duration("24h") == 86400
    assert parse_duration("2") == 2
    assert parse_duration("500ms") == 0.5


def test_config_precedence():
    env = {"UPLOAD_SERVER_PORT": "9000", "PORT": "5000", "UPLOAD_SERVER_CHUNK_SIZE": "2MiB"}
    config = Config.load(["--port", "7000"], environ=env)
    assert config.port == 7000
    assert config.chunk_size == 2 * 1024**2
    assert Config.load(environ={"PORT": "5000"}).port == 5000
    assert Config.load(environ=env).port == 9000


def test_config_defaults_match_the_seed():
    config = Config.load(environ={})
    assert config.port == 8080
    assert config.chunk_size == 1024**2
    assert str(config.upload_dir) == "uploads"
    assert config.writers >= 1
    assert config.max_bytes_per_second == 0


def test_readme_lists_every_setting():
    from pathlib import Path

    from upload_server.config import SETTINGS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [s.flag for s in SETTINGS if f"`{s.flag}`" not in readme]
    assert not missing, f"README's settings table lacks {missing}"


def test_a_shared_session_store_needs_shared_storage():
    with pytest.raises(ValueError, match="--storage s3://"):
        Config.load(session_store="redis://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="5MiB"):
        Config.load(s3_part_size="4MiB")
    config = Config.load(session_store="redis://127.0.0.1:6379/0", storage="s3://bucket/prefix")
    assert config.shared and config.storage == "s3://bucket/prefix"


def test_session_ids_are_long_and_start_with_a_letter_or_digit():
    from upload_server.sessions.record import is_session_id, new_session_id

    ids = {new_session_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) >= 22 and i[0].isalnum() and is_session_id(i) for i in ids)


def _tus_session(bytes_written: int, segments: list[list[int]]) -> Session:
    return Session(
        id="a" * 22,
        protocol="tus",
        filename="f",
        chunk_size=1024 * 1024,
        writer=0,
        total_bytes=100,
        bytes_written=bytes_written,
        segments=segments,
    )


@pytest.mark.parametrize(
    ("data", "files", "before", "after", "cut_to"),
    [
        # data + whole named segments: all counted, nothing to cut
        (10, {10: 5, 15: 5}, (20, [[10, 5], [15, 5]]), (20, [[10, 5], [15, 5]]), 10),
        # a segment half copied before the crash: the copy is cut, the segment copied again
        (13, {10: 5}, (15, [[10, 5]]), (15, [[10, 5]]), 10),
        # a segment whose file is gone but whose bytes are in the data was copied
        (15, {}, (15, [[10, 5]]), (15, []), 15),
        # a segment lost (power loss): the count ends before it
        (10, {}, (15, [[10, 5]]), (10, []), 10),
        # a short segment file ends the count, and so does everything after it
        (10, {10: 3, 15: 5}, (20, [[10, 5], [15, 5]]), (10, []), 10),
        # data shorter than the record (unsynced writes lost): back to the data
        (7, {10: 5}, (15, [[10, 5]]), (7, []), 7),
        # no segments: bytes past the offset were never acknowledged
        (12, {}, (10, []), (10, []), 10),
    ],
)
def test_reconcile_counts_what_the_disk_holds(data, files, before, after, cut_to):
    session = _tus_session(*before)
    assert segments.reconcile(session, data, files.get) == cut_to
    assert (session.bytes_written, session.segments) == after


def test_cut_bodies_read_only_ascii_offsets():
    from upload_server.cut_bodies import _offset_of

    assert _offset_of(" 42 ") == 42
    assert _offset_of("²³") is None and _offset_of("-1") is None and _offset_of("") is None


def test_the_limits_forget_what_ended_elsewhere_but_never_a_creation_in_flight():
    """The cluster sweep lists only unfinished records: a counted session missing from them
    ended (on another node); a place taken by a creation not yet saved is kept."""

    def session(state: str = "waiting") -> Session:
        return Session(
            id=new_session_id(), protocol="tus", filename="f", chunk_size=1, writer=0, state=state
        )

    limits = SessionLimits(10, 3, [])
    ended_elsewhere, still_open = session(), session()
    limits.count(ended_elsewhere)
    limits.count(still_open)
    counted = limits.saved()
    limits.take(None, "being-created", by_client=True)  # its record is not saved yet
    limits.forget_ended(counted, [still_open])
    assert limits.saved() == {still_open.id}
    limits.take(None, "one-more", by_client=True)  # the third place
    with pytest.raises(errors.UploadError) as refused:  # still_open, in flight, one-more
        limits.take(None, "two-more", by_client=True)
    assert refused.value.code == "too_many_sessions"


def test_the_record_cache_answers_only_while_the_writers_counter_stands():
    """The front end's cache of live records (HEAD and status without the Manager) never shows
    a record the Manager no longer holds: a writer's change, even one that moves the offset
    back, or one in progress, makes it read the Manager again."""
    ctx = multiprocessing.get_context()
    arrays = [new_counters(ctx), new_counters(ctx)]
    manager: dict = {}
    reads = []

    class Proxy(dict):
        def get(self, key, default=None):
            reads.append(key)
            return manager.get(key, default)

        def __setitem__(self, key, value):
            manager[key] = value

    front = LiveSessions(Proxy())
    front.cache = RecordCache(lambda: arrays)
    writer = LiveSessions(Proxy(), Counters(arrays[1]))
    session = Session(new_session_id(), "tus", "a.bin", 1024, writer=1, bytes_written=8)
    writer.put(session)
    assert front.get(session.id).bytes_written == 8
    assert front.get(session.id).bytes_written == 8
    assert len(reads) == 1  # the second answer came from memory
    session.bytes_written = 4  # a failed write gives up a named segment
    writer.put(session)
    assert front.get(session.id).bytes_written == 4
    with Counters(arrays[1]).changing(session.id):  # a change under way is never kept
        assert front.get(session.id).bytes_written == 4
        assert front.get(session.id).bytes_written == 4
    assert len(reads) == 4
    arrays[1] = new_counters(ctx)  # the writer was replaced: nothing of the old one counts
    front.get(session.id)
    assert len(reads) == 5
    front.put(session)  # the front end's own change
    front.get(session.id)
    assert len(reads) == 6
    front.get(session.id).metadata["x"] = "y"  # every answer is a copy of its own
    assert "x" not in front.get(session.id).metadata
    assert len(reads) == 6


def test_a_record_as_a_dict_is_asdict_and_shares_nothing_mutable():
    import dataclasses

    session = Session(
        id=new_session_id(),
        protocol="tus",
        filename="f.bin",
        chunk_size=1024,
        writer=0,
        error={"code": "io_error", "message": "m"},
        metadata={"k": "v"},
        parts=["a"],
        segments=[[0, 5], [5, 7]],
    )
    record = session.to_dict()
    assert record == dataclasses.asdict(session)
    assert list(record) == [f.name for f in dataclasses.fields(Session)]
    record["segments"][0][1] = 99
    record["metadata"]["k"] = "changed"
    record["error"]["code"] = "changed"
    record["parts"].append("b")
    assert session.segments == [[0, 5], [5, 7]] and session.metadata == {"k": "v"}
    assert session.error == {"code": "io_error", "message": "m"} and session.parts == ["a"]
    assert Session.from_dict({**session.to_dict(), "unknown": 1}) == session


@pytest.mark.parametrize("portable_mode", [False, True])
def test_the_chunk_reader_gives_each_range_and_refuses_a_short_file(
    tmp_path, monkeypatch, portable_mode
):
    """A writer's chunks come from one reused buffer (`preadv`), or from a map in portable
    mode (Windows): the same bytes either way, read-only, and a file shorter than asked is
    a ValueError, as a map past its end is."""
    import os

    from upload_server import fileio, portable

    monkeypatch.setattr(portable, "ACTIVE", portable_mode)
    content = os.urandom(3 * 65536 + 17)
    path = tmp_path / "segment"
    path.write_bytes(content)
    reader = fileio.ChunkReader()
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, length in [(0, 1000), (65536, 70000), (5, 3 * 65536 + 12), (100, 10)]:
            with reader.read(fd, offset, length) as view:
                assert bytes(view) == content[offset : offset + length]
                assert view.readonly
        with pytest.raises(ValueError), reader.read(fd, 65536, len(content)):
            pass
        monkeypatch.setattr(fileio.ChunkReader, "MAX_BUFFER", 4096)  # larger chunks are mapped
        with reader.read(fd, 65536, 70000) as view:
            assert bytes(view) == content[65536 : 65536 + 70000]
    finally:
        os.close(fd)
