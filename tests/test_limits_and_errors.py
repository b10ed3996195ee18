"""Limits no one client can use up for everyone, and errors that always answer.

Real servers in subprocesses, loopback only. Clients bind their socket's source address
(127.0.0.1, 127.0.0.2, ...: all of 127/8 is loopback on Linux) to look like different clients.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import random
import shutil
import socket
import subprocess

import pytest
import requests
from requests.adapters import HTTPAdapter

from .conftest import MiB, wait_for
from .tus_http import OCTET, TUS, Tus

# -- clients by source address -----------------------------------------------------------------


class _SourceAddress(HTTPAdapter):
    """Every connection of a requests session leaves from `source` (a loopback address)."""

    def __init__(self, source: str, **kwargs) -> None:
        self.source = source
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs) -> None:
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def tus_from(server, source: str) -> Tus:
    client = Tus(server.base)
    client.http.mount("http://", _SourceAddress(source, pool_maxsize=8))
    return client


def _create_many(client: Tus, count: int, threads: int = 8) -> list[requests.Response]:
    """`count` creations of 10-byte uploads, a few at a time."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda _: client.create(10), range(count)))


def _other_loopback_works() -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.2", 0))
        except OSError:
            return False
    return True


needs_loopback_aliases = pytest.mark.skipif(
    not _other_loopback_works(), reason="127.0.0.2 is not usable as a source address here"
)


def _check_one_client_is_limited(server, limit: int, extra: int) -> list[str]:
    """`limit + extra` creations from 127.0.0.1: `limit` succeed, the rest get 429, and
    127.0.0.2 can still create and upload through both APIs. The URLs 127.0.0.1 created."""
    greedy = tus_from(server, "127.0.0.1")
    responses = _create_many(greedy, limit + extra)
    codes = [r.status_code for r in responses]
    assert codes.count(201) == limit and codes.count(429) == extra, sorted(set(codes))
    refused = greedy.create(10)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_sessions"
    assert refused.headers.get("Retry-After")
    seed = greedy.http.post(server.url("/upload"), files={"file": ("a", b"abc")}, timeout=30)
    assert seed.status_code == 429 and seed.json()["error"]["code"] == "too_many_sessions"

    other = tus_from(server, "127.0.0.2")
    data = random.Random(1).randbytes(MiB + 5)
    url = other.upload(data, chunk=256 * 1024, filename="other.bin")
    status = server.status(url.rsplit("/", 1)[1])
    assert status["completed"] and (server.upload_dir / status["storedAs"]).read_bytes() == data
    seed = other.http.post(server.url("/upload"), files={"file": ("s.bin", b"seed")}, timeout=30)
    assert seed.status_code == 201, seed.text
    assert server.wait_state(seed.json()["sessionID"], "completed")["completed"]
    return [r.headers["Location"] for r in responses if r.status_code == 201]


@needs_loopback_aliases
def test_one_client_cannot_use_up_the_session_limit(make_server):
    # auth off (the default): the per-owner limit counts per client, not one shared owner
    server = make_server(["--max-sessions-per-owner", "100"])
    urls = _check_one_client_is_limited(server, 100, 10)

    # the address never owns anything: an upload created from 127.0.0.1 is seen, continued and
    # finished from 127.0.0.3 (a phone that moved to another network)...
    moved = tus_from(server, "127.0.0.3")
    head = moved.head(urls[0])
    assert head.status_code == 200 and head.headers["Upload-Offset"] == "0"
    assert moved.patch(urls[0], 0, b"0123456789").status_code == 204
    status = moved.http.get(
        server.url("/upload/status"), params={"sessionID": urls[0].rsplit("/", 1)[1]}, timeout=10
    )
    assert status.json()["completed"] is True
    # ... and it still counted against 127.0.0.1, which gets that slot back
    greedy = tus_from(server, "127.0.0.1")
    wait_for(lambda: greedy.create(10).status_code == 201)
    assert greedy.create(10).status_code == 429
    assert moved.delete(urls[1]).status_code == 204  # terminating frees a slot too
    wait_for(lambda: greedy.create(10).status_code == 201)

    # the limits' index survives a restart: the recovered sessions still count per client
    server.stop()
    server.start()
    assert tus_from(server, "127.0.0.1").create(10).status_code == 429
    assert tus_from(server, "127.0.0.2").create(10).status_code == 201


@needs_loopback_aliases
def test_default_limit_with_1100_creations_from_one_address(make_server):
    # the numbers: 1,100 creations from one address at the default limit (1,000)
    server = make_server()
    _check_one_client_is_limited(server, 1000, 100)


def test_client_keys_group_ipv6_by_64():
    from upload_server.clients import client_key

    assert client_key("203.0.113.7") == "ip:203.0.113.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:2::1") == "ip:2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.1") == "ip:192.0.2.1"
    assert client_key("fe80::1%eth0") == "ip:fe80::/64"
    assert client_key(None) is None and client_key("") is None
    assert client_key("not an address") == "addr:not an address"


@needs_loopback_aliases
def test_forwarded_client_counts_behind_a_trusted_proxy(make_server):
    # behind a trusted proxy the client is the forwarded address waitress computes
    server = make_server(["--max-sessions-per-owner", "2", "--trusted-proxy", "127.0.0.1"])
    tus = Tus(server.base)

    def create(forwarded: str) -> int:
        return tus.create(10, headers={"X-Forwarded-For": forwarded}).status_code

    assert [create("198.51.100.1") for _ in range(3)] == [201, 201, 429]
    assert create("198.51.100.2") == 201
    assert create("2001:db8::1") == 201
    assert create("2001:db8::2") == 201  # the same /64
    assert create("2001:db8::3") == 429
    # from an address that is not the trusted proxy, the header is not believed
    untrusted = tus_from(server, "127.0.0.2")
    codes = [
        untrusted.create(10, headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code
        for i in range(3)
    ]
    assert codes == [201, 201, 429]


# -- errors always answer ------------------------------------------------------------------------


def _fill(disk, leave: int) -> None:
    """Fill the small disk so that about `leave` bytes stay free."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as handle:
        handle.truncate(0)
        remaining = max(0, free - leave)
        block = b"\0" * MiB
        while remaining > 0:
            handle.write(block[: min(MiB, remaining)])
            remaining -= min(MiB, remaining)


def test_full_disk_during_a_body_spill_answers_507(small_disk, make_server):
    # no reserve: nothing refuses the body up front, and waitress spills it (past 512 KiB) to a
    # file in the spool directory on the full disk
    server = make_server(["--min-free-space", "0"], upload_dir=small_disk / "uploads")
    tus = Tus(server.base)
    url = tus.new(8 * MiB)
    data = random.Random(3).randbytes(8 * MiB)
    _fill(small_disk, leave=MiB)
    for attempt in range(3):
        response = tus.patch(url, 0, data)
        assert response.status_code == 507, (attempt, response.text)
        assert response.json()["error"]["code"] == "disk_full"
        assert response.headers["Tus-Resumable"] == "1.0.0"
        seed = requests.post(server.url("/upload"), files={"file": ("f", data)}, timeout=60)
        assert seed.status_code == 507, seed.text
        assert seed.json()["error"]["code"] == "disk_full"
    # without Expect: 100-continue, the whole body on the wire at once, raw
    with socket.create_connection((server.host, server.port), timeout=30) as raw:
        raw.sendall(
            f"PATCH {url.split(str(server.port), 1)[1]} HTTP/1.1\r\nHost: x\r\n"
            f"Tus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\nContent-Type: {OCTET}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
        )
        answer = b""
        with contextlib.suppress(OSError):
            raw.sendall(data)
        with contextlib.suppress(OSError):
            while chunk := raw.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 507 "), answer[:200]
    assert b'"disk_full"' in answer
    assert not list((server.upload_dir / ".upload_server" / "spool").iterdir())
    assert tus.head(url).headers["Upload-Offset"] == "0"

    # room again: the same upload goes on, and the server is none the worse
    (small_disk / "filler").unlink()
    for offset in range(0, len(data), 2 * MiB):  # pieces: portable mode keeps three copies
        assert tus.patch(url, offset, data[offset : offset + 2 * MiB]).status_code == 204
    status = server.status(url.rsplit("/", 1)[1])
    assert status["completed"] and (server.upload_dir / status["storedAs"]).read_bytes() == data


@contextlib.contextmanager
def refusing_new_files(directory):
    """The directory takes no new entries, even from root (ext4's immutable attribute), so
    publishing a finished upload into it fails; skipped where the attribute cannot be set."""
    result = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot make {directory} immutable here ({result.stderr.strip()})")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_a_completion_that_failed_is_never_shown_as_done(make_server):
    """A tus client takes Upload-Offset == Upload-Length for a finished upload and sends no more
    PATCHes. When publishing the file fails, the final PATCH gets the error; a HEAD completes the
    upload again and, while that still fails, answers the error instead of an offset the client
    would report as success. Once the directory takes files, the next HEAD completes it; a
    resume through the seed API completes such an upload by itself."""
    server = make_server([])
    tus = Tus(server.base)
    data = random.Random(5).randbytes(3 * MiB)
    head_url, resume_url = (
        tus.new(len(data), filename="a.bin"),
        tus.new(len(data), filename="b.bin"),
    )
    with refusing_new_files(server.upload_dir):
        for url in (head_url, resume_url):
            failed = tus.patch(url, 0, data)
            assert failed.status_code == 500, failed.text
            assert failed.json()["error"]["code"] == "io_error"
        again = tus.head(head_url)
        assert again.status_code == 500  # not the 200 a client would take for success
        status = server.status(head_url.rsplit("/", 1)[1])
        assert status["state"] == "failed" and status["error"]["code"] == "io_error"
    done = tus.head(head_url)
    assert done.status_code == 200 and done.headers["Upload-Offset"] == str(len(data))
    status = server.status(head_url.rsplit("/", 1)[1])
    assert status["state"] == "completed"
    assert (server.upload_dir / status["storedAs"]).read_bytes() == data

    resume_id = resume_url.rsplit("/", 1)[1]
    resumed = requests.post(
        server.url("/upload/resume"), params={"sessionID": resume_id}, timeout=30
    )
    assert resumed.status_code == 200, resumed.text
    status = server.wait_state(resume_id, "completed", "failed")
    assert status["state"] == "completed", status
    assert (server.upload_dir / status["storedAs"]).read_bytes() == data
    assert tus.head(resume_url).headers["Upload-Offset"] == str(len(data))


def test_error_answer_to_a_post_overridden_to_head_is_framed(server):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
    override = {"X-HTTP-Method-Override": "HEAD", **TUS}
    for path, status in (
        ("/files/AAAAAAAAAAAAAAAAAAAAAA", 404),
        ("/files/nope", 404),
        ("/upload/status", 405),
    ):
        connection.request("POST", path, headers=override)
        response = connection.getresponse()
        body = response.read()  # as much as Content-Length says: the connection stays usable
        assert response.status == status
        assert int(response.headers["Content-Length"]) == len(body) > 0
        assert json.loads(body)["error"]["code"]
    # a successful one (the offset) too, and a real HEAD is unchanged
    url = Tus(server.base).new(10)
    path = url.split(str(server.port), 1)[1]
    connection.request("POST", path, headers=override)
    response = connection.getresponse()
    assert response.status == 200 and response.read() == b""
    assert response.headers["Upload-Offset"] == "0"
    assert response.headers["Content-Length"] == "0"
    connection.request("HEAD", "/files/AAAAAAAAAAAAAAAAAAAAAA", headers=TUS)
    response = connection.getresponse()
    assert response.status == 404 and response.read() == b""
    connection.close()


def test_seed_filenames_lose_bidi_overrides_controls_and_invalid_bytes(server):
    names = {
        b"invoice\xe2\x80\xaefdp.exe": "invoice_fdp.exe",  # U+202E, raw UTF-8
        b"c1\xc2\x85\xc2\x9f.txt": "c1__.txt",  # U+0085, U+009F
        b"bad\x80\xff.bin": "bad__.bin",  # not UTF-8 at all
        "r\u00e9sum\u00e9.txt".encode(): "r\u00e9sum\u00e9.txt",
    }
    for raw, expected in names.items():
        body = (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="' + raw + b'"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\nabc\r\n--b--\r\n"
        )
        response = requests.post(
            server.url("/upload"),
            data=body,
            headers={"Content-Type": "multipart/form-data; boundary=b"},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        assert response.json()["files"][0]["filename"] == expected
        stored = server.wait_state(response.json()["sessionID"], "completed")["storedAs"]
        assert stored.startswith(expected.rsplit(".", 1)[0]), stored
    # the same through tus metadata
    tus = Tus(server.base)
    url = tus.new(3, filename="x\u202egpj.exe\u0085")
    assert tus.patch(url, 0, b"abc").status_code == 204
    assert server.status(url.rsplit("/", 1)[1])["filename"] == "x_gpj.exe_"


# -- portable mode ---------------------------------------------------------------------------------


def _spooled(server, how: str) -> float:
    text = requests.get(server.url("/metrics"), timeout=10).text
    for line in text.splitlines():
        if line.startswith(f'upload_server_bytes_spooled_total{{how="{how}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("portable", ["0", "1"])
def test_portable_mode_takes_the_fall_backs(make_server, portable):
    # UPLOAD_SERVER_PORTABLE=1: the body buffer is not an O_TMPFILE file, so a PATCH body is
    # copied into the spool instead of linked; writers are spawned; the bytes are the same
    server = make_server(
        env={"UPLOAD_SERVER_PORTABLE": portable, "UPLOAD_SERVER_LOG_LEVEL": "INFO"}
    )
    data = random.Random(9).randbytes(3 * MiB + 1)
    url = Tus(server.base).upload(data, chunk=2 * MiB, filename="p.bin")
    status = server.status(url.rsplit("/", 1)[1])
    assert (server.upload_dir / status["storedAs"]).read_bytes() == data
    seed = requests.post(server.url("/upload"), files={"file": ("s.bin", data)}, timeout=60)
    stored = server.wait_state(seed.json()["sessionID"], "completed")["storedAs"]
    assert (server.upload_dir / stored).read_bytes() == data
    if portable == "1":
        assert _spooled(server, "linked") == 0
        assert _spooled(server, "copied") >= 2 * len(data)
        assert "writers (spawn)" in server.log()
    else:
        assert _spooled(server, "linked") >= 2 * MiB
