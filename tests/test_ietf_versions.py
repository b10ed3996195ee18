"""The IETF draft's older interop versions (3, 5, 6) as clients send them, against a real server,
and the 104 path's edge cases (a chunked creation, a creation superseded while its body arrives)."""

from __future__ import annotations

import random
import time

import pytest

from .conftest import MiB
from .draft_http import Draft, creation_head, problem, read_interim

pytestmark = pytest.mark.frontend  # the draft's protocol: how writers start does not change it

IANA = "https://iana.org/assignments/http-problem-types#"


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def stored_bytes(server, url: str) -> bytes:
    status = server.wait_state(url.rsplit("/", 1)[1], "completed", "failed")
    assert status["state"] == "completed", status
    return (server.upload_dir / status["storedAs"]).read_bytes()


def test_interop_3_speaks_upload_incomplete(server):
    """Draft -01: 'The request MUST include the Upload-Incomplete header field ... set to true if
    the end of the request body is not the end of the upload'; the offset retrieval response
    'MUST include the Upload-Incomplete header which is set to true if and only if the upload is
    incomplete'. Appends then carried no partial-upload media type."""
    client = Draft(server.base, version=3)
    data = blob(70_000, 1)
    created = client.http.post(
        client.endpoint,
        headers=client.headers(**{"Upload-Incomplete": "?1"}),
        data=data[:30_000],
        timeout=30,
    )
    assert created.status_code == 201, created.text
    assert created.headers["Upload-Incomplete"] == "?1"
    url = created.headers["Location"]
    head = client.head(url)
    assert head.headers["Upload-Incomplete"] == "?1"
    assert head.headers["Upload-Offset"] == "30000"
    assert "Upload-Limit" not in head.headers
    done = client.http.patch(
        url,
        headers=client.headers(**{"Upload-Offset": "30000", "Upload-Incomplete": "?0"}),
        data=data[30_000:],
        timeout=30,
    )
    assert done.status_code == 200, done.text
    assert done.headers["Upload-Incomplete"] == "?0"
    assert stored_bytes(server, url) == data


def test_interop_5_takes_any_append_type_and_has_no_problem_types(server):
    client = Draft(server.base, version=5)
    url = client.new(10)
    ok = client.append(url, 0, b"12345", complete=False, headers={"Content-Type": "text/plain"})
    assert ok.status_code == 204, ok.text
    wrong = client.append(url, 3, b"x", complete=False)
    assert wrong.status_code == 409
    assert problem(wrong)["type"] == "about:blank"
    assert wrong.headers["Upload-Offset"] == "5"


def test_interop_6_limits_say_expires(server):
    client = Draft(server.base, version=6)
    url = client.new(10)
    limit = client.head(url).headers["Upload-Limit"]
    assert "expires=" in limit and "max-age" not in limit
    wrong = client.append(url, 3, b"x", complete=False)
    assert problem(wrong)["type"] == IANA + "mismatching-upload-offset"
    too_long = client.append(url, 0, b"x" * 11, complete=False)
    assert problem(too_long)["type"] == "about:blank"  # inconsistent-upload-length came with 7


def test_a_chunked_creation_gets_its_104_and_completes(server):
    data = blob(200_000, 2)
    extra = {"Transfer-Encoding": "chunked", "Upload-Length": len(data)}
    with creation_head(server, None, extra=extra) as sock:
        status, fields = read_interim(sock)
        assert status == 104, fields
        sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")
        status, final = read_interim(sock, timeout=60)
        assert status == 201, final
    assert stored_bytes(server, fields["location"]) == data


def test_a_new_request_ends_a_creation_still_arriving(server):
    """The creation's body counts as the upload's append in flight once its 104 is sent: the
    client's HEAD (it thinks that connection dead) ends it, and what arrived is kept."""
    client = Draft(server.base)
    data = blob(2 * MiB, 3)
    with creation_head(server, len(data)) as sock:
        status, fields = read_interim(sock)
        assert status == 104
        sock.sendall(data[:MiB])
        time.sleep(0.3)
        head = client.head(fields["location"])
        assert head.status_code == 204, head.text
        offset = int(head.headers["Upload-Offset"])
        assert offset == MiB
    done = client.append(fields["location"], offset, data[offset:], complete=True)
    assert done.status_code == 200, done.text
    assert stored_bytes(server, fields["location"]) == data


@pytest.mark.parametrize("version", ["3", "5", "6", "7", "8"])
def test_every_version_gets_the_104_with_its_own_number(server, version):
    marker = {"Upload-Incomplete": "?0"} if version == "3" else {}
    with creation_head(server, 3, version=version, extra=marker, method="PUT") as sock:
        status, fields = read_interim(sock)
        assert status == 104
        assert fields["upload-draft-interop-version"] == version
        sock.sendall(b"abc")
        assert read_interim(sock)[0] == 201


def test_every_error_a_draft_client_gets_is_a_problem(server):
    client = Draft(server.base)
    url = client.new()
    for response in (
        client.http.post(url, headers=client.headers(), timeout=30),  # 405
        client.http.delete(server.url("/files/a/b"), headers=client.headers(), timeout=30),  # 404
        client.http.head(server.url("/files/AAAAAAAAAAAAAAAAAAAAAA"), headers=client.headers()),
    ):
        assert 400 <= response.status_code < 500
        assert response.headers["Content-Type"] == "application/problem+json", response
    tus = client.http.post(url, headers={"Tus-Resumable": "1.0.0"}, timeout=30)
    assert tus.status_code == 405 and tus.json()["error"]["code"]


def test_waitress_own_413_is_a_problem_with_limits(make_server):
    """A body past the server's size limit is refused by waitress before the app: a draft client
    still gets a problem, with `Upload-Limit` ('A server responding with a 413 ... SHOULD
    include the Upload-Limit header field')."""
    server = make_server(["--max-upload-size", "1000"])
    with creation_head(server, 10_000_000) as sock:
        status, fields = read_interim(sock)
        assert status == 413
        assert fields["content-type"] == "application/problem+json"
        assert "max-size=1000" in fields["upload-limit"]
