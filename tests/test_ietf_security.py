"""The IETF draft with credentials and hooks: the creation behind the 104 runs them once, before
the body; completion (and its post-finish hook) waits for the client's `Upload-Complete: ?1`."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from upload_server.auth import hash_key

from .conftest import wait_for
from .draft_http import Draft, creation_head, problem, read_interim
from .test_security import Receiver

pytestmark = pytest.mark.frontend

ALICE, BOB = "alice-draft-key", "bob-draft-key"


@pytest.fixture
def receiver():
    instance = Receiver()
    yield instance
    instance.httpd.shutdown()


def test_credentials_are_checked_before_the_104_and_on_every_request(make_server):
    keys = f"alice={hash_key(ALICE)},bob={hash_key(BOB)}"
    server = make_server(["--auth", "true", "--api-keys", keys])
    with creation_head(server, 10, complete=False) as sock:
        status, fields = read_interim(sock)
        assert status == 401, fields  # refused on its headers: no 104, no body read
    with creation_head(
        server, 10, complete=False, extra={"Authorization": f"Bearer {ALICE}"}
    ) as sock:
        status, fields = read_interim(sock)
        assert status == 104
        sock.sendall(b"0123456789")
        assert read_interim(sock)[0] == 201
    url = fields["location"]
    alice, bob = Draft(server.base), Draft(server.base)
    alice.http.headers["Authorization"] = f"Bearer {ALICE}"
    bob.http.headers["Authorization"] = f"Bearer {BOB}"
    assert alice.head(url).headers["Upload-Offset"] == "10"
    refused = bob.head(url)
    assert refused.status_code == 404  # another credential's upload does not exist for bob
    assert problem(bob.append(url, 10, b"x", complete=False))["status"] == 404


def test_hooks_run_once_and_post_finish_waits_for_completion(make_server, receiver):
    server = make_server(["--hook-url", f"http://127.0.0.1:{receiver.port}/hook"])
    extra = {"Content-Disposition": 'inline; filename="draft-hooked.bin"', "Upload-Length": 15}
    with creation_head(server, 10, complete=False, extra=extra) as sock:
        assert read_interim(sock)[0] == 104
        sock.sendall(b"0123456789")
        status, fields = read_interim(sock)
        assert status == 201
    url = fields["location"]
    client = Draft(server.base)
    assert client.append(url, 10, b"abcde", complete=False).status_code == 204
    time.sleep(0.5)
    assert receiver.of("post-finish") == []  # every byte is in, but the client has not completed
    assert client.append(url, 15, b"", complete=True).status_code == 200
    finished = wait_for(lambda: receiver.of("post-finish"))
    assert finished[0]["upload"]["protocol"] == "ietf"
    assert len(receiver.of("pre-create")) == 1
    assert len(receiver.of("post-create")) == 1

    receiver.reject_filenames.add("evil.exe")
    with creation_head(
        server, 10, complete=False, extra={"Content-Disposition": 'inline; filename="evil.exe"'}
    ) as sock:
        status, fields = read_interim(sock)
        assert status == 422, fields  # the hook's veto, before the body


def test_a_slow_creation_is_cut_at_the_body_rate_and_its_prefix_kept(make_server):
    """The draft's Slowloris note: a creation trickling below --min-body-rate is cut like any
    body, and since its 104 announced the upload, what arrived is kept for the client to resume."""
    server = make_server(["--min-body-rate", "64KiB", "--min-body-rate-window", "2s"])
    data = bytes(range(256)) * 8192  # 2 MiB
    sent = 700 * 1024
    sock = creation_head(server, len(data), complete=False, extra={"Upload-Length": len(data)})
    try:
        status, fields = read_interim(sock)
        assert status == 104
        sock.sendall(data[:sent])
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 15 and not closed:
            try:
                sock.send(data[sent : sent + 1024])
                sent += 1024
                time.sleep(1.0)
                sock.settimeout(0.01)
                closed = sock.recv(1, socket.MSG_PEEK) == b""
            except (TimeoutError, BlockingIOError):
                pass
            except OSError:
                closed = True
        assert closed, "the slow creation was not cut"
    finally:
        sock.close()
    client = Draft(server.base)
    url = fields["location"]
    offset = wait_for(lambda: int(client.head(url).headers["Upload-Offset"]) or None, timeout=10)
    assert 700 * 1024 <= offset <= sent
    assert client.append(url, offset, data[offset:], complete=True).status_code == 200
    status = server.wait_state(url.rsplit("/", 1)[1], "completed")
    assert (server.upload_dir / status["storedAs"]).read_bytes() == data


def test_an_override_cannot_turn_a_download_link_into_a_delete(make_server):
    """`?access_token=` is accepted on downloads only; since X-HTTP-Method-Override now applies to
    every method, authentication judges the overridden method, not the one on the wire."""
    keys = f"alice={hash_key(ALICE)}"
    server = make_server(["--auth", "true", "--api-keys", keys])
    created = requests.post(
        server.url("/files/"),
        headers={
            "Tus-Resumable": "1.0.0",
            "Upload-Length": "3",
            "Authorization": f"Bearer {ALICE}",
        },
        timeout=30,
    )
    url = created.headers["Location"]
    attempt = requests.get(
        f"{url}?access_token={ALICE}",
        headers={"Tus-Resumable": "1.0.0", "X-HTTP-Method-Override": "DELETE"},
        timeout=30,
    )
    assert attempt.status_code == 401, attempt.text
    still = requests.head(
        url, headers={"Tus-Resumable": "1.0.0", "Authorization": f"Bearer {ALICE}"}
    )
    assert still.status_code == 200
