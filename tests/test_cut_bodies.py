"""tus bodies whose connection is cut mid-way (upload_server/cut_bodies.py), over real sockets.

Each cut request is written by hand on a raw loopback socket: the request line, the headers with
the full Content-Length, part of the body, then the socket is closed (or left silent until the
server's idle timeout). Everything sent on loopback arrives, so the prefix the server keeps is
exactly what the test sent. A client retrying right after a cut must see the kept bytes at once:
HEAD and PATCH wait (bounded) for a prefix of their upload that is still being stored.

Most HEADs that follow a cut go over a new connection, as a client whose connection was just cut
opens one; the last test sends it over another connection that was already open.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest
import requests

from upload_server.auth import hash_key

from .conftest import MiB, Server, sha256_file, wait_for
from .test_operations import metric
from .tus_http import OCTET, TUS, Tus, checksum

INFO_LOGS = {"UPLOAD_SERVER_LOG_LEVEL": "INFO", "UPLOAD_SERVER_LOG_FORMAT": "json"}
KEPT = "upload_server_cut_bytes_total"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One server for the module, logging at INFO so the cut_bodies lines can be read."""
    instance = Server(tmp_path_factory.mktemp("cut") / "uploads", env=INFO_LOGS).start()
    yield instance
    instance.stop()


@pytest.fixture
def tus(server):
    client = Tus(server.base)
    yield client
    client.http.close()  # keep-alive connections would pile up on the shared server


# -- helpers ----------------------------------------------------------------------------------


def open_cut(
    server: Server,
    method: str,
    path: str,
    headers: dict[str, str],
    declared: int,
    body: bytes,
) -> socket.socket:
    """Send a request that announces `declared` body bytes but carries only `body`; the socket
    is returned open (the caller closes it, or lets it stall)."""
    assert len(body) < declared
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {declared}")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    sock.sendall(body)
    return sock


def cut(server: Server, method: str, path: str, headers: dict, declared: int, body: bytes) -> None:
    """The same, then close the connection: the body is cut after len(body) bytes."""
    open_cut(server, method, path, headers, declared, body).close()


def cut_patch(server: Server, url: str, offset: int, declared: int, body: bytes, **extra: str):
    headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": OCTET}
    headers.update({name.replace("_", "-"): value for name, value in extra.items()})
    cut(server, "PATCH", path_of(url), headers, declared, body)


def path_of(url: str) -> str:
    return "/" + url.split("://", 1)[1].split("/", 1)[1]


def upload_id(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[1]


def offset_of(url: str, headers: dict | None = None) -> int:
    """The offset a HEAD over a new connection answers (a client retrying after a cut)."""
    head = requests.head(url, headers={**TUS, **(headers or {})}, timeout=30)
    assert head.status_code == 200, head.text
    return int(head.headers["Upload-Offset"])


def cut_lines(server: Server, pattern: str = "") -> list[str]:
    """Messages of the upload_server.cut_bodies logger that match `pattern`."""
    messages = []
    for line in server.log().splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry["logger"] == "upload_server.cut_bodies" and re.search(pattern, entry["message"]):
            messages.append(entry["message"])
    return messages


def wait_lines(server: Server, pattern: str, count: int) -> list[str]:
    """The `count` cut_bodies lines that match. (A line is written just after its prefix is
    stored, so just after a waiting HEAD is let go: wait for it.)"""
    wait_for(lambda: len(cut_lines(server, pattern)) >= count, timeout=10)
    lines = cut_lines(server, pattern)
    assert len(lines) == count, lines
    return lines


def the_line(server: Server, session_id: str) -> str:
    """The one cut_bodies line about an upload."""
    return wait_lines(server, session_id, 1)[0]


def cut_bytes(server: Server, outcome: str) -> float:
    text = requests.get(server.url("/metrics"), timeout=10).text
    return metric(text, KEPT, outcome=outcome)


def counts(server: Server, outcome: str, value: float) -> bool:
    """Whether upload_server_cut_bytes_total{outcome} reaches `value` (counted, as logged,
    just after the prefix is stored)."""
    return bool(wait_for(lambda: cut_bytes(server, outcome) == value, timeout=10))


def assert_no_500(server: Server) -> None:
    """No request, the replayed cut ones included, was answered with a 5xx."""
    text = requests.get(server.url("/metrics"), timeout=10).text
    for status in ("500", "503", "507"):
        assert metric(text, "upload_server_request_duration_seconds_count", status=status) == 0
    assert not cut_lines(server, r"failed|\b5\d\d\b"), cut_lines(server)
    assert "Traceback" not in server.log()


def finish_and_compare(server: Server, tus: Tus, url: str, source: Path) -> None:
    """PATCH the rest of `source` from the upload's offset; the stored file is `source`. (`tus`
    carries the credential, if the server wants one.)"""
    data = source.read_bytes()
    head = tus.head(url)
    assert head.status_code == 200, head.text
    offset = int(head.headers["Upload-Offset"])
    done = tus.patch(url, offset, data[offset:])
    assert done.status_code == 204, done.text
    assert done.headers["Upload-Offset"] == str(len(data))

    def completed() -> dict | None:
        params = {"sessionID": upload_id(url)}
        status = tus.http.get(server.url("/upload/status"), params=params, timeout=10).json()
        return status if status["state"] == "completed" else None

    status = wait_for(completed, timeout=30)
    assert sha256_file(server.upload_dir / status["storedAs"]) == sha256_file(source)


# -- 1, 2: a big body cut after 15 of 20 MiB ---------------------------------------------------


def test_cut_patch_keeps_its_prefix(server, tus, files):
    source = files(20 * MiB, seed=1)
    data = source.read_bytes()
    url = tus.new(len(data), filename="cut-patch.bin")
    kept_before = cut_bytes(server, "kept")
    cut_patch(server, url, 0, len(data), data[: 15 * MiB])
    assert offset_of(url) == 15 * MiB  # the HEAD right after the close waits for the prefix
    assert counts(server, "kept", kept_before + 15 * MiB)
    line = the_line(server, upload_id(url))
    assert line.startswith(f"kept {15 * MiB} bytes of a cut append of upload {upload_id(url)}")
    assert f"(disconnected after {15 * MiB} of {20 * MiB} bytes); offset now {15 * MiB}" in line
    finish_and_compare(server, tus, url, source)
    assert_no_500(server)


def test_cut_creation_with_upload_keeps_its_prefix(server, tus, files):
    source = files(20 * MiB, seed=2)
    data = source.read_bytes()
    before = set(cut_lines(server, "cut creation"))
    headers = {
        **TUS,
        "Upload-Length": str(len(data)),
        "Upload-Metadata": "filename Y3V0LWNyZWF0aW9uLmJpbg==",  # cut-creation.bin
        "Content-Type": OCTET,
    }
    cut(server, "POST", "/files/", headers, len(data), data[: 15 * MiB])
    # The client never saw a Location: the log line names the upload that was created.
    (line,) = wait_for(lambda: set(cut_lines(server, "cut creation")) - before, timeout=20)
    found = re.match(r"kept (\d+) bytes of a cut creation of upload (\S+) at offset 0 ", line)
    assert found, line
    assert int(found.group(1)) == 15 * MiB
    session_id = found.group(2)
    status = server.status(session_id)
    assert status["protocol"] == "tus" and status["bytesWritten"] == 15 * MiB
    url = server.url("/files/" + session_id)
    assert offset_of(url) == 15 * MiB
    assert tus.head(url).headers["Upload-Length"] == str(20 * MiB)
    finish_and_compare(server, tus, url, source)
    assert (server.upload_dir / "cut-creation.bin").exists()
    assert_no_500(server)


# -- 3, 4: prefixes that must not count -------------------------------------------------------


def test_cut_patch_with_checksum_keeps_nothing(server, tus, files):
    source = files(2 * MiB, seed=3)
    data = source.read_bytes()
    url = tus.new(len(data))
    discarded_before = cut_bytes(server, "discarded")
    kept_before = cut_bytes(server, "kept")
    cut_patch(server, url, 0, len(data), data[:MiB], Upload_Checksum=checksum("sha256", data))
    assert offset_of(url) == 0
    assert counts(server, "discarded", discarded_before + MiB)
    assert cut_bytes(server, "kept") == kept_before
    line = the_line(server, upload_id(url))
    assert line.startswith(f"discarded {MiB} bytes of a cut append of upload {upload_id(url)}")
    assert "Upload-Checksum" in line
    assert server.status(upload_id(url))["bytesWritten"] == 0
    finish_and_compare(server, tus, url, source)
    assert_no_500(server)


def test_cut_creation_with_checksum_creates_nothing(server):
    records = server.upload_dir / ".upload_server" / "sessions"
    before = set(records.iterdir())
    data = b"c" * 300_000
    headers = {
        **TUS,
        "Upload-Length": str(len(data)),
        "Upload-Checksum": checksum("sha1", data),
        "Content-Type": OCTET,
    }
    discarded_before = cut_bytes(server, "discarded")
    cut(server, "POST", "/files/", headers, len(data), data[:100_000])
    assert counts(server, "discarded", discarded_before + 100_000)
    assert wait_lines(server, r"^discarded 100000 bytes of a cut creation of upload \(new\)", 1)
    assert set(records.iterdir()) == before
    assert_no_500(server)


def test_cut_patch_at_the_wrong_offset_changes_nothing(server, tus, files):
    source = files(2 * MiB, seed=4)
    data = source.read_bytes()
    url = tus.new(len(data))
    assert tus.patch(url, 0, data[:MiB]).status_code == 204
    discarded_before = cut_bytes(server, "discarded")
    garbage = b"\xee" * (MiB // 2)
    cut_patch(server, url, 0, MiB, garbage)  # behind the offset
    assert offset_of(url) == MiB
    cut_patch(server, url, MiB + 5, MiB // 2, garbage[:1000])  # ahead of it
    assert offset_of(url) == MiB
    assert counts(server, "discarded", discarded_before + MiB // 2 + 1000)
    lines = wait_lines(server, upload_id(url), 2)
    assert len(lines) == 2 and all(line.startswith("discarded") for line in lines), lines
    assert all("409" in line for line in lines), lines
    finish_and_compare(server, tus, url, source)  # the data is still exactly the source
    assert_no_500(server)


def test_cut_patch_to_a_paused_upload_keeps_nothing(server, tus, files):
    source = files(2 * MiB, seed=5)
    data = source.read_bytes()
    url = tus.new(len(data))
    session_id = upload_id(url)
    assert tus.patch(url, 0, data[: MiB // 2]).status_code == 204
    params = {"sessionID": session_id}
    paused = requests.get(server.url("/upload/pause"), params=params, timeout=10)
    assert paused.status_code == 200 and paused.json()["paused"] is True
    discarded_before = cut_bytes(server, "discarded")
    cut_patch(server, url, MiB // 2, MiB, data[MiB // 2 : MiB])
    assert offset_of(url) == MiB // 2
    assert counts(server, "discarded", discarded_before + MiB // 2)
    line = the_line(server, session_id)
    assert line.startswith(f"discarded {MiB // 2} bytes") and "423" in line, line
    assert server.status(session_id)["bytesWritten"] == MiB // 2
    resumed = requests.post(server.url("/upload/resume"), params=params, timeout=10)
    assert resumed.status_code == 200, resumed.text
    finish_and_compare(server, tus, url, source)
    assert_no_500(server)


def test_cut_patch_needs_the_credential_of_the_owner(make_server, files):
    alice, bob = "alice-secret-key", "bob-secret-key"
    keys = f"alice={hash_key(alice)},bob={hash_key(bob)}"
    server = make_server(["--auth", "true", "--api-keys", keys], env=INFO_LOGS)
    owner = {"Authorization": f"Bearer {alice}"}
    tus = Tus(server.base)
    tus.http.headers.update(owner)
    source = files(2 * MiB, seed=6)
    data = source.read_bytes()
    url = tus.new(len(data))
    part = data[: MiB // 2]
    cut_patch(server, url, 0, MiB, part)  # no credential
    cut_patch(server, url, 0, MiB, part, Authorization="Bearer not-a-key")
    cut_patch(server, url, 0, MiB, part, Authorization=f"Bearer {bob}")  # not the owner
    assert offset_of(url, owner) == 0
    assert counts(server, "discarded", 3 * len(part))
    lines = wait_lines(server, "^discarded", 3)
    answers = sorted(re.search(r": (\d{3}) ", line).group(1) for line in lines)
    assert answers == ["401", "401", "404"], lines
    assert cut_bytes(server, "kept") == 0
    cut_patch(server, url, 0, MiB, part, Authorization=f"Bearer {alice}")
    assert offset_of(url, owner) == len(part)
    assert counts(server, "kept", len(part))
    finish_and_compare(server, tus, url, source)
    assert_no_500(server)


# -- 5: bodies waitress keeps in memory -------------------------------------------------------


@pytest.mark.parametrize("size", [5000, 100 * 1024], ids=["under-8KiB", "100KiB"])
def test_small_cut_bodies_are_kept(server, tus, files, size):
    source = files(3 * size, seed=7)
    data = source.read_bytes()
    url = tus.new(len(data))
    assert tus.patch(url, 0, data[:size]).status_code == 204
    cut_patch(server, url, size, 2 * size, data[size : 2 * size - 123])
    assert offset_of(url) == 2 * size - 123
    assert the_line(server, upload_id(url)).startswith(f"kept {size - 123} bytes of a cut append")
    finish_and_compare(server, tus, url, source)
    assert_no_500(server)


def test_a_cut_before_any_body_byte_changes_nothing(server, tus):
    url = tus.new(100)
    cut_patch(server, url, 0, 100, b"")
    assert offset_of(url) == 0
    assert cut_lines(server, upload_id(url)) == []
    assert tus.patch(url, 0, b"x" * 100).status_code == 204


def test_a_whole_body_then_a_close_is_stored_once(server, tus, files):
    """Not a cut: the body arrived whole, only the answer is lost. It is stored as any PATCH."""
    source = files(2 * MiB, seed=8)
    data = source.read_bytes()
    url = tus.new(len(data))
    kept_before = cut_bytes(server, "kept")
    sock = open_cut(
        server,
        "PATCH",
        path_of(url),
        {**TUS, "Upload-Offset": "0", "Content-Type": OCTET},
        MiB + 1,
        data[:MiB],
    )
    sock.sendall(data[MiB : MiB + 1])
    sock.close()
    assert wait_for(lambda: offset_of(url) == MiB + 1, timeout=10)
    assert cut_bytes(server, "kept") == kept_before
    assert cut_lines(server, upload_id(url)) == []
    finish_and_compare(server, tus, url, source)


@pytest.mark.parametrize("chunks", [[3000, 4000], [300_000, 700_000]], ids=["small", "1MiB"])
def test_cut_chunked_body_keeps_the_decoded_prefix(server, tus, files, chunks):
    """Transfer-Encoding: chunked, cut in the middle of a chunk: what is kept is the body's
    bytes, never its chunk framing."""
    source = files(2 * sum(chunks), seed=13)
    data = source.read_bytes()
    url = tus.new(len(data))
    lines = [f"PATCH {path_of(url)} HTTP/1.1", "Host: 127.0.0.1", "Tus-Resumable: 1.0.0"]
    lines += ["Upload-Offset: 0", f"Content-Type: {OCTET}", "Transfer-Encoding: chunked"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sent = 0
        for size in chunks:
            sock.sendall(b"%x\r\n" % size + data[sent : sent + size] + b"\r\n")
            sent += size
        sock.sendall(b"%x\r\n" % 5000 + data[sent : sent + 1234])  # a chunk cut short
        sent += 1234
    assert offset_of(url) == sent
    finish_and_compare(server, tus, url, source)
    assert_no_500(server)


def test_head_waits_at_most_two_seconds_for_a_body_still_arriving(server, tus, files):
    source = files(MiB, seed=14)
    data = source.read_bytes()
    url = tus.new(len(data))
    headers = {**TUS, "Upload-Offset": "0", "Content-Type": OCTET}
    sock = open_cut(server, "PATCH", path_of(url), headers, len(data), data[:400_000])
    try:
        started = time.monotonic()
        assert offset_of(url) == 0  # the body has not ended: nothing to see yet
        assert 1.5 <= time.monotonic() - started <= 5
    finally:
        sock.close()
    assert offset_of(url) == 400_000
    finish_and_compare(server, tus, url, source)


def test_head_waits_for_a_prefix_that_takes_long_to_store(make_server, files):
    """A writer held to 2 MiB/s needs about 2.5 s for a 5 MiB prefix, longer than the 2 s a
    HEAD waits for a body still arriving: the HEAD waits for the prefix being stored."""
    server = make_server(["--max-bytes-per-second", "2MiB"], env=INFO_LOGS)
    tus = Tus(server.base)
    source = files(6 * MiB, seed=15)
    data = source.read_bytes()
    url = tus.new(len(data))
    cut_patch(server, url, 0, len(data), data[: 5 * MiB])
    started = time.monotonic()
    assert offset_of(url) == 5 * MiB
    assert time.monotonic() - started >= 1.5
    finish_and_compare(server, tus, url, source)
    assert_no_500(server)


# -- 6: a body that stalls until the idle timeout ---------------------------------------------


def test_a_stalled_body_is_kept_after_the_idle_timeout(make_server, files):
    server = make_server(["--idle-timeout", "2s"], env=INFO_LOGS)
    tus = Tus(server.base)
    source = files(2 * MiB, seed=9)
    data = source.read_bytes()
    url = tus.new(len(data))
    headers = {**TUS, "Upload-Offset": "0", "Content-Type": OCTET}
    started = time.monotonic()
    sock = open_cut(server, "PATCH", path_of(url), headers, len(data), data[:MiB])
    try:
        wait_for(lambda: cut_lines(server, upload_id(url)), timeout=15)
        line = the_line(server, upload_id(url))
        waited = time.monotonic() - started
        assert line.startswith(f"kept {MiB} bytes of a cut append"), line
        assert f"(timeout after {MiB} of {2 * MiB} bytes)" in line, line
        assert 1.5 <= waited <= 10, waited
        assert offset_of(url) == MiB
        sock.settimeout(10)
        assert sock.recv(1024) == b""  # the server closed the stalled connection, answering nothing
    finally:
        sock.close()
    finish_and_compare(server, tus, url, source)
    assert_no_500(server)


# -- 7: a kept prefix survives kill -9 ---------------------------------------------------------


def test_kept_prefix_survives_kill_9(make_server, files, tmp_path):
    upload_dir = tmp_path / "durable"
    server = make_server(env=INFO_LOGS, upload_dir=upload_dir)
    tus = Tus(server.base)
    source = files(4 * MiB, seed=10)
    data = source.read_bytes()
    url = tus.new(len(data), filename="survivor.bin")
    cut_patch(server, url, 0, len(data), data[: 3 * MiB + 17])
    acknowledged = offset_of(url)
    assert acknowledged == 3 * MiB + 17
    server.kill()
    again = make_server(env=INFO_LOGS, upload_dir=upload_dir)
    tus = Tus(again.base)
    url = again.url(path_of(url))
    assert acknowledged <= offset_of(url) <= 3 * MiB + 17
    finish_and_compare(again, tus, url, source)
    assert (upload_dir / "survivor.bin").exists()


# -- 8: X-HTTP-Method-Override ----------------------------------------------------------------


def test_cut_post_with_method_override_is_kept(server, tus, files):
    source = files(MiB, seed=11)
    data = source.read_bytes()
    url = tus.new(len(data))
    headers = {
        **TUS,
        "X-HTTP-Method-Override": "PATCH",
        "Upload-Offset": "0",
        "Content-Type": OCTET,
    }
    cut(server, "POST", path_of(url), headers, len(data), data[:300_000])
    assert offset_of(url) == 300_000
    line = the_line(server, upload_id(url))
    assert line.startswith("kept 300000 bytes of a cut append"), line
    finish_and_compare(server, tus, url, source)
    assert_no_500(server)


# -- 9: the counter of kept bytes -------------------------------------------------------------


def test_kept_bytes_are_counted(make_server, files):
    server = make_server(env=INFO_LOGS)
    tus = Tus(server.base)
    fresh = requests.get(server.url("/metrics"), timeout=10).text
    assert f'{KEPT}{{outcome="kept"}} 0.0' in fresh
    assert f'{KEPT}{{outcome="discarded"}} 0.0' in fresh
    data = files(3 * MiB, seed=12).read_bytes()
    url = tus.new(len(data))
    sent = [MiB + 1, 7000, 200_000]
    offset = 0
    for size in sent:
        cut_patch(server, url, offset, len(data) - offset, data[offset : offset + size])
        offset += size
        assert offset_of(url) == offset
    assert counts(server, "kept", sum(sent))
    assert cut_bytes(server, "discarded") == 0
    text = requests.get(server.url("/metrics"), timeout=10).text
    assert metric(text, "upload_server_bytes_received_total", protocol="tus") == sum(sent)
    assert_no_500(server)


# -- a retry over a connection that was already open --------------------------------------------


def head_on(sock: socket.socket, url: str) -> int:
    """Send a HEAD on an open keep-alive connection; the Upload-Offset it answers."""
    sock.sendall(
        f"HEAD {path_of(url)} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n\r\n".encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        data = sock.recv(65536)
        assert data, answer
        answer += data
    found = re.search(rb"\r\nupload-offset: *(\d+)\r\n", answer, re.IGNORECASE)
    assert answer.startswith(b"HTTP/1.1 200 ") and found, answer
    return int(found.group(1))


def test_a_retry_over_a_keep_alive_connection_sees_the_kept_prefix(make_server):
    """A HEAD sent over another, already open connection right after a short cut request (its
    whole prefix still in the kernel's buffers, while other clients connect) can reach the app
    before waitress has read the cut connection: HEAD first lets the I/O loop read what has
    arrived (`LOOP.settle`), so it still answers the kept offset."""
    server = make_server(env=INFO_LOGS)
    tus = Tus(server.base)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as retry:
        for _ in range(40):
            url = tus.new(200_000)
            assert head_on(retry, url) == 0  # the client's connection is open and served
            # Other clients connecting at the same moment (a busy server) widen the window.
            others = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(60)]
            try:
                cut_patch(server, url, 0, 200_000, b"k" * 100_000)
                assert head_on(retry, url) == 100_000
            finally:
                for other in others:
                    other.close()


def test_a_repeat_of_a_kept_cut_patch_is_refused_on_its_headers(server, tus, files):
    """Browsers re-send a PATCH cut on a reused connection by themselves, with the same
    Upload-Offset. Its headers alone get 409 with the offset after the kept prefix, so the client
    does not send a whole body for nothing; the PATCH from that offset goes on."""
    source = files(2 * MiB, seed=31)
    data = source.read_bytes()
    url = tus.new(len(data))
    cut_patch(server, url, 0, len(data), data[:MiB])
    assert offset_of(url) == MiB
    headers = {**TUS, "Upload-Offset": "0", "Content-Type": OCTET}
    with open_cut(server, "PATCH", path_of(url), headers, len(data), b"") as sock:
        answer = b""  # no body byte sent: the answer comes on the headers, then the close
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 409 "), answer
    assert b"\r\nUpload-Offset: 1048576" in head and b"\r\nTus-Resumable: 1.0.0" in head, head
    error = json.loads(body)["error"]
    assert error["code"] == "offset_mismatch" and error["offset"] == MiB, error
    finish_and_compare(server, tus, url, source)
    assert_no_500(server)


def test_a_repeat_of_a_discarded_cut_patch_goes_on(server, tus, files):
    source = files(MiB, seed=32)
    data = source.read_bytes()
    url = tus.new(len(data))
    session_id = upload_id(url)
    params = {"sessionID": session_id}
    requests.get(server.url("/upload/pause"), params=params, timeout=10)
    cut_patch(server, url, 0, len(data), data[: MiB // 2])  # refused: paused
    assert the_line(server, session_id).startswith("discarded")
    requests.post(server.url("/upload/resume"), params=params, timeout=10)
    assert tus.patch(url, 0, data).status_code == 204
    assert_no_500(server)
