"""Resumable Uploads for HTTP (draft-ietf-httpbis-resumable-upload, interop version 8) against a
real server, written from the draft's text: each test quotes the rule it checks."""

from __future__ import annotations

import base64
import hashlib
import random
import re
import time

import pytest
import requests

from .conftest import MiB, sha256_file
from .draft_http import PARTIAL, Draft, append_head, creation_head, interop, problem, read_interim

pytestmark = pytest.mark.frontend  # the draft's protocol: how writers start does not change it

IANA = "https://iana.org/assignments/http-problem-types#"


@pytest.fixture(scope="module")
def client(server):
    return Draft(server.base)


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def upload_id(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[1]


def stored_bytes(server, url: str) -> bytes:
    status = server.wait_state(upload_id(url), "completed", "failed")
    assert status["state"] == "completed", status
    return (server.upload_dir / status["storedAs"]).read_bytes()


# -- creation -----------------------------------------------------------------------------------


def test_creation_with_the_whole_representation_completes(server, client):
    """'If the Upload-Complete request header field is set to true ... If the request content
    was fully processed, no resumable upload is needed and the server proceeds to process the
    request and generate a response.' The response MUST include `Upload-Complete: ?1`."""
    data = blob(300_000, 1)
    response = client.create(
        data,
        complete=True,
        headers={
            "Content-Disposition": 'inline; filename="photo one.jpg"',
            "Content-Type": "image/jpeg",
            "Upload-Length": str(len(data)),
        },
    )
    assert response.status_code == 201, response.text
    assert response.headers["Upload-Complete"] == "?1"
    url = response.headers["Location"]
    assert stored_bytes(server, url) == data
    status = server.status(upload_id(url))
    assert status["protocol"] == "ietf"
    assert status["filename"] == "photo one.jpg"
    assert response.json()["sha256"] == hashlib.sha256(data).hexdigest()


def test_creation_without_completion_answers_location_and_limits(server, client):
    """'If the Upload-Complete request header field is set to false ... the server MUST include
    the Location response header field pointing to the upload resource and MUST include the
    Upload-Limit header field ... Servers are RECOMMENDED to use the 201 (Created) status code.'"""
    data = blob(100_000, 2)
    response = client.create(data[:40_000], complete=False, headers={"Upload-Length": "100000"})
    assert response.status_code == 201, response.text
    assert response.headers["Upload-Complete"] == "?0"
    assert "max-size=" in response.headers["Upload-Limit"]
    url = response.headers["Location"]
    head = client.head(url)
    assert head.headers["Upload-Offset"] == "40000"
    assert server.status(upload_id(url))["state"] == "waiting"


def test_empty_creation_then_appends_and_explicit_completion(server, client):
    """An empty creation with `?0` 'can be used to retrieve the upload resource's URI before
    transferring any representation data'; appends follow; `Upload-Complete: ?1` on an empty
    append completes it: 'This usage requires the full representation data to have been
    processed during prior requests.' Until then the upload is incomplete even when every byte
    is in: 'The offset could match the length, but the upload can still be incomplete.'"""
    data = blob(3 * MiB + 17, 3)
    url = client.new(len(data))
    offset = 0
    for start in range(0, len(data), MiB):
        piece = data[start : start + MiB]
        response = client.append(url, offset, piece, complete=False)
        assert response.status_code == 204, response.text
        assert response.headers["Upload-Complete"] == "?0"
        offset = int(response.headers["Upload-Offset"])
    assert offset == len(data)
    head = client.head(url)
    assert head.headers["Upload-Complete"] == "?0"
    assert server.status(upload_id(url))["state"] == "waiting"
    done = client.append(url, offset, b"", complete=True)
    assert done.status_code == 200, done.text
    assert done.headers["Upload-Complete"] == "?1"
    assert stored_bytes(server, url) == data
    assert client.head(url).headers["Upload-Complete"] == "?1"


def test_last_append_completes_with_its_content(server, client):
    data = blob(500_000, 4)
    url = client.new()
    assert client.append(url, 0, data[:200_000], complete=False).status_code == 204
    done = client.append(url, 200_000, data[200_000:], complete=True)
    assert done.status_code == 200, done.text
    assert done.headers["Upload-Complete"] == "?1"
    assert (
        sha256_file(server.upload_dir / server.wait_state(upload_id(url), "completed")["storedAs"])
        == hashlib.sha256(data).hexdigest()
    )


def test_put_and_patch_also_create(server, client):
    """'all request methods that allow content are possible, such as POST, PUT, and PATCH.'"""
    for method in ("PUT", "PATCH"):
        response = client.http.request(
            method,
            client.endpoint,
            headers=client.headers(**{"Upload-Complete": "?1"}),
            data=b"hello",
            timeout=30,
        )
        assert response.status_code == 201, (method, response.text)
        assert stored_bytes(server, response.headers["Location"]) == b"hello"


def test_creation_lengths_must_agree(client):
    """'If indicators (1) and (2) are both present in the same request, their indicated lengths
    MUST match' (problem type inconsistent-upload-length)."""
    response = client.create(b"abc", complete=True, headers={"Upload-Length": "5"})
    assert response.status_code == 400
    assert problem(response)["type"] == IANA + "inconsistent-upload-length"


def test_a_length_first_announced_on_an_append_is_recorded(server, client):
    """'The client can indicate the length in the Upload-Length header field in the upload
    creation request or in any upload append request' ... 'If the server learns of different
    lengths for the same upload, it MUST reject' (inconsistent-upload-length). A length
    announced on an append is what a later HEAD reports and what later appends are held to,
    also when the announcing append carries no content."""
    data = blob(3000, 7)
    url = client.new()
    assert "Upload-Length" not in client.head(url).headers
    response = client.append(url, 0, data[:1000], complete=False, headers={"Upload-Length": "3000"})
    assert response.status_code == 204, response.text
    assert client.head(url).headers["Upload-Length"] == "3000"
    for length in ("2999", "4000"):  # a different length, with or without content
        for content in (b"", data[1000:1100]):
            refused = client.append(
                url, 1000, content, complete=False, headers={"Upload-Length": length}
            )
            assert refused.status_code == 400, refused.text
            assert problem(refused)["type"] == IANA + "inconsistent-upload-length"
    completed = client.append(url, 1000, data[1000:], complete=True)
    assert completed.status_code == 200, completed.text
    assert stored_bytes(server, url) == data

    empty = client.new()
    response = client.append(empty, 0, b"", complete=False, headers={"Upload-Length": "5"})
    assert response.status_code == 204, response.text
    assert client.head(empty).headers["Upload-Length"] == "5"
    past = client.append(empty, 0, b"abcdef", complete=False)
    assert past.status_code == 400 and problem(past)["type"] == IANA + "inconsistent-upload-length"
    assert client.head(empty).headers["Upload-Offset"] == "0"

    huge = client.new()  # an announced length past max-size is refused on the append too
    too_large = client.append(huge, 0, b"", complete=False, headers={"Upload-Length": str(1 << 42)})
    assert too_large.status_code == 413 and "max-size=" in too_large.headers["Upload-Limit"]
    assert "Upload-Length" not in client.head(huge).headers


# -- offset retrieval ---------------------------------------------------------------------------


def test_offset_retrieval_headers(client):
    """A successful response to HEAD 'MUST include the offset in the Upload-Offset header field,
    MUST include the Upload-Complete header field, MUST include the length in the Upload-Length
    header field, ... MUST indicate the limits in the Upload-Limit header field, and SHOULD
    include the Cache-Control header field with the value no-store'."""
    url = client.new(1000)
    client.append(url, 0, b"x" * 10, complete=False)
    for method in ("HEAD", "GET"):
        response = client.http.request(method, url, headers=client.headers(), timeout=30)
        assert response.status_code in (200, 204), response.text
        assert response.headers["Upload-Offset"] == "10"
        assert response.headers["Upload-Complete"] == "?0"
        assert response.headers["Upload-Length"] == "1000"
        assert "max-size=" in response.headers["Upload-Limit"]
        assert response.headers["Cache-Control"] == "no-store"
        assert "Tus-Resumable" not in response.headers


# -- append ------------------------------------------------------------------------------------


def test_mismatching_offset_is_a_problem(client):
    """'If the Upload-Offset request header field value does not match the current offset, the
    server MUST reject the request with a 409 (Conflict) status code and the Upload-Complete
    header field set to false. The response MUST include the correct offset in the
    Upload-Offset header field.' The problem has expected-offset and provided-offset."""
    url = client.new()
    client.append(url, 0, b"a" * 100, complete=False)
    response = client.append(url, 250, b"b" * 10, complete=False)
    assert response.status_code == 409
    assert response.headers["Upload-Complete"] == "?0"
    assert response.headers["Upload-Offset"] == "100"
    body = problem(response)
    assert body["type"] == IANA + "mismatching-upload-offset"
    assert body["expected-offset"] == 100
    assert body["provided-offset"] == 250


def test_append_past_the_length_is_refused(client):
    """'If the length is known, the server MUST prevent the offset from exceeding the upload
    length by rejecting the request'."""
    url = client.new(10)
    response = client.append(url, 0, b"z" * 11, complete=False)
    assert response.status_code == 400
    assert problem(response)["type"] == IANA + "inconsistent-upload-length"
    assert client.head(url).headers["Upload-Offset"] == "0"


def test_completing_at_another_length_is_refused(client):
    url = client.new(10)
    response = client.append(url, 0, b"z" * 5, complete=True)
    assert response.status_code == 400
    assert problem(response)["type"] == IANA + "inconsistent-upload-length"


def test_append_needs_partial_upload_media_type(client):
    url = client.new()
    response = client.append(url, 0, b"abc", complete=False, headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    problem(response)


def test_append_to_a_completed_upload_is_refused_and_lost_answer_replayed(server, client):
    """'If the upload is already complete, the server MUST NOT modify the upload resource and
    MUST reject the request'; 'The server can choose to replay the final response to the client
    if the request to append to the completed upload is valid.'"""
    response = client.create(b"done", complete=True)
    url = response.headers["Location"]
    stored_bytes(server, url)
    refused = client.append(url, 4, b"more", complete=False)
    assert 400 <= refused.status_code < 500
    problem(refused)
    replay = client.append(url, 4, b"", complete=True)
    assert replay.status_code == 200
    assert replay.headers["Upload-Complete"] == "?1"


# -- cancellation, limits, versions ---------------------------------------------------------------


def test_cancellation(client):
    url = client.new(100)
    assert client.cancel(url).status_code == 204
    assert client.head(url).status_code == 404


def test_options_announces_limits(client):
    """'When responding to an OPTIONS request without the Upload-Complete header field, ... the
    server MUST include the Upload-Limit header field'."""
    response = client.http.options(client.endpoint, timeout=30)
    limits = dict(
        member.strip().split("=", 1) for member in response.headers["Upload-Limit"].split(",")
    )
    assert int(limits["max-size"]) > 0
    assert limits["min-size"] == "0"
    assert "max-append-size" in limits


def test_too_large_announces_limits(client):
    """'A server responding with a 413 (Content Too Large) status code as a result of its upload
    limits SHOULD include the Upload-Limit header field in this response'."""
    response = client.create(complete=False, headers={"Upload-Length": str(1 << 42)})
    assert response.status_code == 413
    assert "max-size=" in response.headers["Upload-Limit"]
    problem(response)


@pytest.mark.parametrize("version", [None, "2", "99", "x"])
def test_missing_or_unknown_version_is_a_clear_problem(client, version):
    headers = {"Upload-Complete": "?0"}
    if version is not None:
        headers["Upload-Draft-Interop-Version"] = version
    response = requests.post(client.endpoint, headers=headers, timeout=30)
    assert response.status_code == 400
    body = problem(response)
    assert "Upload-Draft-Interop-Version" in body["detail"]


def test_tus_requests_are_still_tus(server):
    response = requests.post(
        server.url("/files/"), headers={"Tus-Resumable": "1.0.0", "Upload-Length": "3"}, timeout=30
    )
    assert response.status_code == 201
    assert "Upload-Complete" not in response.headers
    assert response.headers["Tus-Resumable"] == "1.0.0"


def test_paused_upload_answers_503_with_retry_after(server, client):
    """Draft clients take any 4xx as final: a paused upload must not end them."""
    url = client.new(100)
    paused = requests.get(server.url(f"/upload/pause?sessionID={upload_id(url)}"), timeout=30)
    assert paused.status_code == 200, paused.text
    response = client.append(url, 0, b"q" * 10, complete=False)
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    problem(response)
    requests.post(server.url(f"/upload/resume?sessionID={upload_id(url)}"), timeout=30)
    assert client.append(url, 0, b"q" * 10, complete=False).status_code == 204


def test_interop_version_header_on_other_resources_is_not_draft(server):
    response = requests.get(server.url("/healthz"), headers=interop(), timeout=30)
    assert response.status_code == 200
    assert PARTIAL  # the media type constant the client uses


# -- the 104 before the body ----------------------------------------------------------------------


def test_104_with_location_comes_before_the_body(server):
    """'the server SHOULD announce the upload resource by sending an interim response with the
    104 (Upload Resumption Supported) status code ... it MUST include Location header field
    pointing to the upload resource and MUST include the Upload-Limit header field'; the server
    'MUST also send a header field Upload-Draft-Interop-Version with the interop version' in it.
    Read off a raw socket before a byte of the body is sent."""
    data = blob(2 * MiB, 7)
    with creation_head(server, len(data)) as sock:
        status, fields = read_interim(sock)
        assert status == 104, fields
        location = fields["location"]
        assert fields["upload-draft-interop-version"] == "8"
        assert "max-size=" in fields["upload-limit"]
        assert server.status(upload_id(location))["state"] == "waiting"
        sock.sendall(data)
        status, fields = read_interim(sock, timeout=60)
        assert status == 201, fields
        assert fields["location"] == location, "the same Location in interim and final answer"
        assert fields["upload-complete"] == "?1"
    assert stored_bytes(server, location) == data


def test_no_104_for_an_unknown_version(server):
    """'Server implementations ... MUST NOT send a 104 (Upload Resumption Supported) informational
    response when the interop version ... is missing or mismatching.'"""
    with creation_head(server, 5, version="99") as sock:
        sock.sendall(b"hello")
        status, _ = read_interim(sock)
        assert status == 400


def test_100_continue_is_not_omitted(server):
    """'the server MUST NOT omit the 100 (Continue) response because it has sent an interim
    response with the 104 (Upload Resumption Supported) status code.'"""
    with creation_head(server, 5, extra={"Expect": "100-continue"}) as sock:
        statuses = [read_interim(sock)[0], read_interim(sock)[0]]
        assert sorted(statuses) == [100, 104]
        sock.sendall(b"hello")
        assert read_interim(sock)[0] == 201


def test_a_refused_creation_is_answered_before_its_body(make_server):
    server = make_server(["--max-upload-size", "1000"])
    with creation_head(server, 5000) as sock:
        status, fields = read_interim(sock)
        assert status == 413, fields
        assert "upload-limit" in fields


# -- interrupted transfers keep what arrived ---------------------------------------------------


def test_interrupted_creation_resumes_from_what_the_server_kept(server, client):
    """'The server might not process the entire request content when the upload is interrupted
    ... the server SHOULD append as much of the request content as possible to the upload
    resource, allowing the client to resume the upload from where it was interrupted. In
    addition, the upload resource MUST NOT be considered complete then.'"""
    data = blob(2 * MiB + 5, 8)
    sent = MiB + 333
    with creation_head(server, len(data)) as sock:
        status, fields = read_interim(sock)
        assert status == 104
        location = fields["location"]
        sock.sendall(data[:sent])
    head = client.head(location)
    assert head.status_code == 204
    assert head.headers["Upload-Complete"] == "?0"
    offset = int(head.headers["Upload-Offset"])
    assert offset == sent
    done = client.append(location, offset, data[offset:], complete=True)
    assert done.status_code == 200, done.text
    assert stored_bytes(server, location) == data


def test_interrupted_append_keeps_its_prefix(server, client):
    data = blob(3 * MiB, 9)
    url = client.new(len(data))
    assert client.append(url, 0, data[:MiB], complete=False).status_code == 204
    with append_head(server, url, MiB, 2 * MiB, complete=True) as sock:
        sock.sendall(data[MiB : MiB + 700_000])
    offset = int(client.head(url).headers["Upload-Offset"])
    assert offset == MiB + 700_000
    status = server.status(upload_id(url))
    # (still "writing" while the writer copies the kept prefix behind its answer: write-behind)
    assert status["state"] in ("waiting", "writing"), "a cut ?1 must not complete"
    assert status["completed"] is False
    assert client.append(url, offset, data[offset:], complete=True).status_code == 200
    assert stored_bytes(server, url) == data


def test_a_new_request_ends_an_append_still_in_flight(server, client):
    """'If a server receives a new request to retrieve the offset ... while a previous request
    for ... appending representation data to the same upload resource is still ongoing, the
    server SHOULD ... [terminate] the previous request before processing the new request.' The
    client is not locked out, and what arrived of the old request is kept."""
    data = blob(2 * MiB, 10)
    url = client.new(len(data))
    with append_head(server, url, 0, len(data), complete=True) as sock:
        sock.sendall(data[:MiB])
        time.sleep(0.3)
        head = client.head(url)
        assert head.status_code == 204, head.text
        offset = int(head.headers["Upload-Offset"])
        assert offset == MiB
    done = client.append(url, offset, data[offset:], complete=True)
    assert done.status_code == 200, done.text
    assert stored_bytes(server, url) == data


def test_draft_uploads_are_counted_in_metrics(server, client):
    response = client.create(b"counted", complete=True)
    stored_bytes(server, response.headers["Location"])
    text = requests.get(server.url("/metrics"), timeout=10).text
    for name in ("uploads_started", "uploads_completed", "bytes_received"):
        match = re.search(rf'^upload_server_{name}_total\{{protocol="ietf"\}} (\S+)$', text, re.M)
        assert match and float(match.group(1)) > 0, name


# -- integrity (RFC 9530) ---------------------------------------------------------------------


def _digest(algorithm: str, data: bytes) -> str:
    name = {"sha-256": "sha256", "sha-512": "sha512"}[algorithm]
    return f"{algorithm}=:{base64.b64encode(hashlib.new(name, data).digest()).decode()}:"


def test_repr_digest_is_checked_at_completion_and_answered(server, client):
    """'If the client knows the integrity digest of the entire representation data before
    creating an upload resource, it can include the Repr-Digest header field ... If the digests
    don't match, the server SHOULD consider the upload failed'; with Want-Repr-Digest 'The
    server SHOULD compute the representation digests ... and include the corresponding
    Repr-Digest header field in the response.'"""
    data = blob(200_000, 11)
    response = client.create(
        complete=False,
        headers={"Repr-Digest": _digest("sha-256", data), "Want-Repr-Digest": "sha-256=10"},
    )
    url = response.headers["Location"]
    done = client.append(url, 0, data, complete=True)
    assert done.status_code == 200, done.text
    assert done.headers["Repr-Digest"] == _digest("sha-256", data)
    assert client.head(url).headers["Repr-Digest"] == _digest("sha-256", data)
    assert stored_bytes(server, url) == data

    wrong = client.create(complete=False, headers={"Repr-Digest": _digest("sha-256", b"other")})
    refused = client.append(wrong.headers["Location"], 0, data, complete=True)
    assert refused.status_code == 400
    problem(refused)
    assert server.status(upload_id(wrong.headers["Location"]))["state"] == "failed"


@pytest.mark.parametrize("algorithm", ["sha-256", "sha-512"])
def test_content_digest_protects_one_append(client, algorithm):
    """'If the digests don't match the server SHOULD consider the transfer failed, not append
    the content to the upload resource, and signal the failure to the client.'"""
    url = client.new()
    bad = client.append(
        url, 0, b"abcdef", complete=False, headers={"Content-Digest": _digest(algorithm, b"x")}
    )
    assert bad.status_code == 400
    problem(bad)
    assert client.head(url).headers["Upload-Offset"] == "0"
    good = client.append(
        url, 0, b"abcdef", complete=False, headers={"Content-Digest": _digest(algorithm, b"abcdef")}
    )
    assert good.status_code == 204, good.text
    assert good.headers["Upload-Offset"] == "6"
