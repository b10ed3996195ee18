"""A seed form's body split at its file part, linked as its spool and hashed while it arrives:
the parser sees the same parts, the link holds exactly the part, and the writer's digest is the
part's, however the claim and the arrival interleave."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from upload_server import fileio
from upload_server.body_buffers import SplitFileBuffer
from upload_server.protocol import multipart
from upload_server.received_body import RequestBody
from workers import follow
from workers.messages import Claim, Follow, Locate

pytestmark = [
    pytest.mark.frontend,  # no writer process: the start method does not matter
    pytest.mark.skipif(
        not os.path.isdir("/proc/self/fd") or not hasattr(os, "O_TMPFILE"), reason="Linux only"
    ),
]

BOUNDARY = "b0undary"
NEEDLE = b"\r\n--" + BOUNDARY.encode()


def _form(content: bytes, *, before: bytes = b"", after: bytes = b"") -> bytes:
    head = (
        before + f"--{BOUNDARY}\r\n".encode() + b'Content-Disposition: form-data; name="file"; '
        b'filename="a.bin"\r\n\r\n'
    )
    return head + content + NEEDLE + after + b"--\r\n"


def _split(tmp_path: Path, data: bytes, at: int) -> tuple[SplitFileBuffer, RequestBody]:
    buffer = SplitFileBuffer(SimpleNamespace(getfile=lambda: io.BytesIO(data)), tmp_path, at)
    return buffer, RequestBody(buffer.getfile(), len(data), tmp_path, len(data))


def test_content_start_needs_only_the_first_bytes():
    data = _form(b"x" * 1000)
    start = data.index(b"x" * 1000)
    head = RequestBody(io.BytesIO(data[: start + 10]), None, Path("."), 10**9)
    assert multipart.content_start(head, BOUNDARY, "file") == start
    short = RequestBody(io.BytesIO(data[: start - 3]), None, Path("."), 10**9)
    assert multipart.content_start(short, BOUNDARY, "file") is None


@pytest.mark.parametrize(
    "before",
    [
        b"",
        b"--b0undary\r\nContent-Disposition: form-data; "
        b'name="sha256"\r\n\r\n' + b"a" * 64 + b"\r\n",
    ],
)
def test_a_split_body_reads_and_parses_as_the_whole(tmp_path, before):
    content = os.urandom(300_000)
    data = _form(content, before=before)
    start = data.index(content)
    buffer, body = _split(tmp_path, data, start)
    assert body.length == len(data)
    assert body.read(0, len(data)) == data
    assert body.find(NEEDLE, 0) == data.find(NEEDLE, 0)  # the first match lies in the prefix
    parts = multipart.parse(body, BOUNDARY)
    assert [(p.name, p.start, p.end) for p in parts] == [
        (p.name, p.start, p.end)
        for p in multipart.parse(RequestBody(io.BytesIO(data), None, tmp_path, 10**9), BOUNDARY)
    ]
    out = os.open(tmp_path / "copy", os.O_RDWR | os.O_CREAT)
    try:
        body.copy_to(out, 5, len(data), 0)  # across the split
        assert os.pread(out, len(data), 0) == data[5:]
    finally:
        os.close(out)
    assert body.starts_file(start) and not body.starts_file(0)
    assert body.link_part(start, start + len(content), tmp_path / "spool")
    assert (tmp_path / "spool").read_bytes() == content
    buffer.close()


def test_a_known_part_end_is_taken_only_where_a_delimiter_is():
    data = _form(
        b"c" * 5000, after=b'\r\nContent-Disposition: form-data; name="x"\r\n\r\n1' + NEEDLE
    )
    body = RequestBody(io.BytesIO(data), None, Path("."), 10**9)
    found = [(p.start, p.end) for p in multipart.parse(body, BOUNDARY)]
    start, end = found[0]
    assert [(p.start, p.end) for p in multipart.parse(body, BOUNDARY, {start: end})] == found
    for wrong in (end - 1, end + 1, start - 1):
        assert [(p.start, p.end) for p in multipart.parse(body, BOUNDARY, {start: wrong})] == found


def test_a_body_split_elsewhere_is_not_linked(tmp_path):
    data = _form(b"y" * 100_000)
    buffer, body = _split(tmp_path, data, 10)
    start = data.index(b"y")
    assert not body.link_part(start, start + 100_000, tmp_path / "spool")
    assert not (tmp_path / "spool").exists()
    buffer.close()


def _ctx(chunk: int = 4096) -> SimpleNamespace:
    replies: list[tuple[int | None, str | None]] = []
    outbox = SimpleNamespace(
        reply=lambda rid, session=None, code=None, message=None, length=None: replies.append(
            (rid, code) if length is None else (rid, length)
        )
    )
    return SimpleNamespace(
        settings=SimpleNamespace(chunk_size=chunk, fsync="never"),
        received={},
        spool_digests={},
        outbox=outbox,
        reply=lambda rid, session=None: replies.append((rid, None)),
        replies=replies,
    )


def _run(steps, rounds: int = 10_000) -> None:
    for _ in range(rounds):
        try:
            next(steps)
        except StopIteration:
            return


def _followed(tmp_path: Path, data: bytes = b""):
    """A growing body file holding `data`, its key, a stand-in writer context and the writer's
    follow of that file (a generator to step)."""
    file = fileio.linkable_tempfile(tmp_path)
    if data:
        file.write(data)
        file.flush()
    status = os.fstat(file.fileno())
    key = (status.st_dev, status.st_ino)
    ctx = _ctx()
    steps = follow.follow(ctx, Follow(key, os.getpid(), file.fileno(), NEEDLE))  # type: ignore[arg-type]
    return file, key, ctx, steps


@pytest.mark.parametrize("cut_before_claim", [False, True])
def test_the_writer_hashes_the_part_as_it_grows(tmp_path, cut_before_claim):
    content = os.urandom(50_000)
    tail = NEEDLE + b"--\r\n"
    file, key, ctx, steps = _followed(tmp_path)
    file.write(content[:20_000])
    file.flush()
    _run(steps, 20)  # hashes what arrived, then waits
    file.write(content[20_000:] + tail)
    file.flush()
    if cut_before_claim:  # the front end linked and cut the file before the writer saw the end
        os.ftruncate(file.fileno(), len(content))
    else:  # the parser asks where the part ends
        follow.locate(ctx, Locate(6, key))  # type: ignore[arg-type]
        _run(steps, 50)
        assert ctx.replies == [(6, len(content))]
        ctx.replies.clear()
    follow.claim(ctx, Claim(7, "sid", key, len(content)))  # type: ignore[arg-type]
    _run(steps)
    assert ctx.replies == [(7, None)]
    assert ctx.spool_digests["sid"].hexdigest() == hashlib.sha256(content).hexdigest()
    assert follow.take_digest(ctx, "sid") is not None and not ctx.received  # type: ignore[arg-type]
    file.close()


def test_a_complete_body_without_a_delimiter_is_refused_at_once(tmp_path):
    # cut short: no delimiter after the part
    file, key, ctx, steps = _followed(tmp_path, b"w" * 10_000 + b"\r\n--b0und")
    _run(steps, 50)
    follow.locate(ctx, Locate(4, key))  # type: ignore[arg-type]
    _run(steps, 3)
    assert ctx.replies == [(4, "not_followed")] and not ctx.received
    file.close()


def test_a_claim_for_another_length_is_refused(tmp_path):
    file, key, ctx, steps = _followed(tmp_path, b"z" * 10_000 + NEEDLE + b"--\r\n")
    _run(steps, 50)
    follow.claim(ctx, Claim(8, "sid", key, 9_999))  # type: ignore[arg-type]
    _run(steps)
    assert ctx.replies == [(8, "not_followed")] and not ctx.spool_digests
    follow.claim(ctx, Claim(9, "other", key, 10_000))  # type: ignore[arg-type]
    assert ctx.replies[-1] == (9, "not_followed")  # nobody follows it any more
    file.close()
