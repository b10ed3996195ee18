"""tus 1.0 over raw HTTP against a real server: every rule, every status code, byte-identical data."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import random
import time

import pytest
import requests

from .conftest import MiB, sha256_file, wait_for
from .tus_http import OCTET, TUS, Tus, checksum, metadata


@pytest.fixture(scope="module")
def tus(server):
    return Tus(server.base)


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def upload_id(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[1]


def stored_sha256(server, url: str) -> str:
    status = server.status(upload_id(url))
    assert status["completed"], status
    return sha256_file(server.upload_dir / status["storedAs"])


# -- core -------------------------------------------------------------------------------------


def test_upload_in_chunks_is_byte_identical(server, tus):
    data = blob(5 * MiB + 123, seed=1)
    url = tus.upload(data, chunk=MiB, filename="five.bin")
    assert url.startswith(server.base + "/files/")
    assert stored_sha256(server, url) == hashlib.sha256(data).hexdigest()
    download = requests.get(url, timeout=60)
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == hashlib.sha256(data).hexdigest()
    assert (server.upload_dir / "five.bin").exists()


# -- extensions -------------------------------------------------------------------------------


def test_creation_with_upload(server, tus):
    data = blob(300_000, seed=2)
    response = tus.create(len(data) + 10, data=data, filename="cwu.bin")
    assert response.status_code == 201
    assert response.headers["Upload-Offset"] == str(len(data))
    url = response.headers["Location"]
    assert tus.patch(url, len(data), b"0123456789").status_code == 204
    assert stored_sha256(server, url) == hashlib.sha256(data + b"0123456789").hexdigest()


def test_creation_body_refused_by_the_writer_leaves_no_upload(server, tus):
    records = server.upload_dir / ".upload_server" / "sessions"
    before = set(records.glob("**/*.json"))
    response = tus.create(10, data=b"abc", headers={"Upload-Checksum": checksum("sha1", b"x")})
    assert response.status_code == 460, response.text
    assert "Location" not in response.headers
    assert response.json()["error"]["code"]
    created = [json.loads(p.read_text()) for p in set(records.glob("**/*.json")) - before]
    assert all(record["state"] == "terminated" for record in created), created


def test_creation_with_whole_upload_completes(server, tus):
    data = blob(1000, seed=3)
    response = tus.create(len(data), data=data)
    assert response.headers["Upload-Offset"] == "1000"
    assert stored_sha256(server, response.headers["Location"]) == hashlib.sha256(data).hexdigest()


def test_empty_upload_completes_at_creation(server, tus):
    url = tus.new(0, filename="empty.txt")
    assert tus.head(url).headers["Upload-Offset"] == "0"
    wait_for(lambda: server.status(upload_id(url))["completed"])
    assert requests.get(url, timeout=10).content == b""


def test_creation_defer_length(server, tus):
    response = tus.create(headers={"Upload-Defer-Length": "1"})
    assert response.status_code == 201
    url = response.headers["Location"]
    head = tus.head(url)
    assert head.headers["Upload-Defer-Length"] == "1"
    assert "Upload-Length" not in head.headers
    assert tus.patch(url, 0, b"hello ").status_code == 204
    final = tus.patch(url, 6, b"world", headers={"Upload-Length": "11"})
    assert final.status_code == 204
    assert tus.head(url).headers["Upload-Length"] == "11"
    assert stored_sha256(server, url) == hashlib.sha256(b"hello world").hexdigest()


@pytest.mark.parametrize("algorithm", ["sha1", "md5", "sha256", "sha512"])
def test_checksum_accepted(server, tus, algorithm):
    data = blob(2 * MiB + 17, seed=4)
    url = tus.new(len(data))
    response = tus.patch(url, 0, data, headers={"Upload-Checksum": checksum(algorithm, data)})
    assert response.status_code == 204, response.text
    assert stored_sha256(server, url) == hashlib.sha256(data).hexdigest()


def test_checksum_mismatch_discards_the_chunk(server, tus):
    data = blob(MiB, seed=5)
    url = tus.new(len(data) * 2)
    assert tus.patch(url, 0, data).status_code == 204
    wrong = tus.patch(url, MiB, data, headers={"Upload-Checksum": checksum("sha1", b"other")})
    assert wrong.status_code == 460
    assert wrong.json()["error"]["code"] == "checksum_mismatch"
    assert tus.head(url).headers["Upload-Offset"] == str(MiB)
    good = tus.patch(url, MiB, data, headers={"Upload-Checksum": checksum("sha256", data)})
    assert good.status_code == 204
    assert stored_sha256(server, url) == hashlib.sha256(data + data).hexdigest()


def test_checksum_mismatch_does_not_set_a_deferred_length(tus):
    url = tus.create(headers={"Upload-Defer-Length": "1"}).headers["Location"]
    wrong = tus.patch(
        url, 0, b"abc", headers={"Upload-Length": "10", "Upload-Checksum": checksum("md5", b"x")}
    )
    assert wrong.status_code == 460
    head = tus.head(url)
    assert head.headers["Upload-Defer-Length"] == "1" and "Upload-Length" not in head.headers
    assert tus.patch(url, 0, b"abc", headers={"Upload-Length": "3"}).status_code == 204


def test_termination(server, tus):
    url = tus.new(100, filename="doomed.bin")
    assert tus.patch(url, 0, b"x" * 50).status_code == 204
    assert tus.delete(url).status_code == 204
    assert tus.head(url).status_code == 410
    assert tus.patch(url, 50, b"x").status_code == 410
    assert tus.delete(url).status_code == 410
    assert server.status(upload_id(url))["terminated"] is True
    partial = server.upload_dir / ".upload_server" / "partial" / upload_id(url)
    assert not partial.exists()


def test_termination_of_a_completed_upload_removes_its_file(server, tus):
    url = tus.upload(b"bye", filename="bye.txt")
    stored = server.upload_dir / server.status(upload_id(url))["storedAs"]
    assert stored.exists()
    assert tus.delete(url).status_code == 204
    assert not stored.exists()


def test_concatenation(server, tus):
    pieces = [blob(MiB + i, seed=10 + i) for i in range(3)]
    partial_urls = []
    for piece in pieces:
        response = tus.create(len(piece), headers={"Upload-Concat": "partial"})
        assert response.status_code == 201
        url = response.headers["Location"]
        assert tus.patch(url, 0, piece).status_code == 204
        assert tus.head(url).headers["Upload-Concat"] == "partial"
        partial_urls.append(url)
    final = tus.create(
        headers={
            "Upload-Concat": "final;" + " ".join(partial_urls),
            "Upload-Metadata": metadata(filename="joined.bin"),
        }
    )
    assert final.status_code == 201, final.text
    url = final.headers["Location"]
    head = tus.head(url)
    whole = b"".join(pieces)
    assert head.headers["Upload-Length"] == str(len(whole))
    assert head.headers["Upload-Offset"] == str(len(whole))
    assert head.headers["Upload-Concat"].startswith("final;")
    assert stored_sha256(server, url) == hashlib.sha256(whole).hexdigest()
    assert tus.patch(url, len(whole), b"x").status_code == 403


def test_concatenation_with_relative_urls(server, tus):
    part = tus.create(3, headers={"Upload-Concat": "partial"}).headers["Location"]
    tus.patch(part, 0, b"abc")
    relative = "/files/" + upload_id(part)
    final = tus.create(headers={"Upload-Concat": f"final;{relative} {relative}"})
    assert final.status_code == 201
    assert stored_sha256(server, final.headers["Location"]) == hashlib.sha256(b"abcabc").hexdigest()


# -- downloads --------------------------------------------------------------------------------


def test_download_is_named_as_the_client_named_it(server, tus):
    first = tus.upload(b"one", filename="twice.txt")
    second = tus.upload(b"two", filename="twice.txt")
    assert (
        server.status(upload_id(second))["storedAs"] != server.status(upload_id(first))["storedAs"]
    )
    disposition = requests.get(second, timeout=10).headers["Content-Disposition"]
    assert 'filename="twice.txt"' in disposition


# -- one session model ------------------------------------------------------------------------


@pytest.fixture
def slow(make_server):
    server = make_server(["--max-bytes-per-second", "2MiB"])
    return server, Tus(server.base)


def test_pause_and_resume_through_the_seed_api(slow):
    server, tus = slow
    url = tus.new(2 * MiB, filename="paused.bin")
    session_id = upload_id(url)
    assert tus.patch(url, 0, b"a" * MiB).status_code == 204
    status = server.status(session_id)
    assert status["protocol"] == "tus" and status["bytesWritten"] == MiB
    paused = requests.get(server.url("/upload/pause"), params={"sessionID": session_id}, timeout=10)
    assert paused.status_code == 200 and paused.json()["paused"] is True
    locked = tus.patch(url, MiB, b"b" * MiB)
    assert locked.status_code == 423
    assert locked.json()["error"]["offset"] == MiB
    assert tus.head(url).headers["Upload-Offset"] == str(MiB)
    resumed = requests.post(
        server.url("/upload/resume"), params={"sessionID": session_id}, timeout=10
    )
    assert resumed.status_code == 200
    assert tus.patch(url, MiB, b"b" * MiB).status_code == 204
    assert server.status(session_id)["completed"] is True


def test_pause_during_a_patch_keeps_all_of_it(slow):
    """The PATCH's body is named in the record before the writer copies it, so it counts whole;
    the pause stops the copy, and the resume finishes it from the spool."""
    server, tus = slow
    data = blob(6 * MiB, seed=10)
    url = tus.new(len(data), filename="held.bin")
    session_id = upload_id(url)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        patch = pool.submit(tus.patch, url, 0, data[: 4 * MiB])
        wait_for(lambda: server.status(session_id)["state"] == "writing", timeout=10)
        time.sleep(1.2)  # about two 1 MiB chunks at 2 MiB/s
        pause = requests.get(
            server.url("/upload/pause"), params={"sessionID": session_id}, timeout=10
        )
        assert pause.status_code == 200
        answer = patch.result()
    assert answer.status_code == 423
    kept = answer.json()["error"]["offset"]
    assert kept == 4 * MiB
    assert tus.head(url).headers["Upload-Offset"] == str(kept)
    resume = requests.post(
        server.url("/upload/resume"), params={"sessionID": session_id}, timeout=10
    )
    assert resume.status_code == 200
    assert tus.patch(url, kept, data[kept:]).status_code == 204
    assert stored_sha256(server, url) == hashlib.sha256(data).hexdigest()


def test_terminate_through_the_seed_api(slow):
    server, tus = slow
    url = tus.new(10)
    response = requests.post(
        server.url("/upload/terminate"), params={"sessionID": upload_id(url)}, timeout=10
    )
    assert response.status_code == 200
    assert tus.head(url).status_code == 410


def test_concurrent_patches_never_interleave(slow):
    server, tus = slow
    data = blob(6 * MiB, seed=8)
    url = tus.new(len(data))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(tus.patch, url, 0, data[: 4 * MiB])
        wait_for(lambda: server.status(upload_id(url))["state"] == "writing", timeout=10)
        second = Tus(server.base).patch(url, 0, data[: 4 * MiB])
        assert second.status_code == 423
        assert second.json()["error"]["code"] == "upload_locked"
        assert first.result().status_code == 204
    assert tus.patch(url, 4 * MiB, data[4 * MiB :]).status_code == 204
    assert stored_sha256(server, url) == hashlib.sha256(data).hexdigest()


# -- browsers ---------------------------------------------------------------------------------


def test_waitress_refusals_carry_tus_and_cors_headers(make_server):
    server = make_server(["--max-upload-size", "1MiB"])
    tus = Tus(server.base)
    url = tus.create(headers={"Upload-Defer-Length": "1"}).headers["Location"]
    too_big = tus.patch(url, 0, b"x" * (3 * MiB), headers={"Origin": "https://app.example"})
    assert too_big.status_code == 413
    assert too_big.headers["Tus-Resumable"] == "1.0.0"
    assert too_big.headers["Access-Control-Allow-Origin"] == "*"
    assert too_big.json()["error"]["code"]
    assert tus.head(url).headers["Upload-Offset"] == "0"


def test_keep_alive_survives_204(server, tus):
    url = tus.new(4)
    session = requests.Session()
    headers = {**TUS, "Content-Type": OCTET}
    first = session.patch(url, headers={**headers, "Upload-Offset": "0"}, data=b"ab", timeout=10)
    assert first.status_code == 204
    assert first.headers.get("Connection", "").lower() != "close"
