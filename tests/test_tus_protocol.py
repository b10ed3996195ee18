"""tus 1.0 over raw HTTP against a real server: every rule, every status code, byte-identical data."""

from __future__ import annotations

import base64
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


def test_options_advertises_the_protocol(server):
    response = requests.options(server.url("/files/"), timeout=10)
    assert response.status_code == 204
    assert response.headers["Tus-Version"] == "1.0.0"
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert int(response.headers["Tus-Max-Size"]) > 0
    extensions = set(response.headers["Tus-Extension"].split(","))
    assert {
        "creation",
        "creation-with-upload",
        "creation-defer-length",
        "expiration",
        "checksum",
        "termination",
        "concatenation",
    } <= extensions
    algorithms = set(response.headers["Tus-Checksum-Algorithm"].split(","))
    assert {"sha1", "md5", "sha256", "sha512"} <= algorithms


@pytest.mark.parametrize("method", ["post", "head", "patch", "delete"])
@pytest.mark.parametrize("version", [None, "0.2.2", "2.0.0"])
def test_tus_resumable_is_required(server, tus, method, version):
    url = tus.new(10)
    target = server.url("/files/") if method == "post" else url
    headers = {"Upload-Length": "10", "Upload-Offset": "0", "Content-Type": OCTET}
    if version:
        headers["Tus-Resumable"] = version
    response = requests.request(method, target, headers=headers, data=b"", timeout=10)
    assert response.status_code == 412
    assert response.headers["Tus-Version"] == "1.0.0"


def test_upload_in_chunks_is_byte_identical(server, tus):
    data = blob(5 * MiB + 123, seed=1)
    url = tus.upload(data, chunk=MiB, filename="five.bin")
    assert url.startswith(server.base + "/files/")
    assert stored_sha256(server, url) == hashlib.sha256(data).hexdigest()
    download = requests.get(url, timeout=60)
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == hashlib.sha256(data).hexdigest()
    assert (server.upload_dir / "five.bin").exists()


def test_head_reports_offset_length_metadata(server, tus):
    meta = metadata(filename="a b.txt", filetype="text/plain", empty="")
    response = tus.create(100, headers={"Upload-Metadata": meta + ",flag"})
    assert response.status_code == 201
    url = response.headers["Location"]
    assert response.headers["Upload-Offset"] == "0"
    assert tus.patch(url, 0, b"x" * 40).status_code == 204
    head = tus.head(url)
    assert head.status_code == 200
    assert head.headers["Upload-Offset"] == "40"
    assert head.headers["Upload-Length"] == "100"
    assert head.headers["Cache-Control"] == "no-store"
    assert head.headers["Upload-Metadata"] == meta + ",flag"
    assert head.headers["Tus-Resumable"] == "1.0.0"
    assert "Upload-Expires" in head.headers
    assert head.content == b""


def test_patch_rules(tus):
    url = tus.new(10)
    bad_type = requests.patch(
        url,
        headers={**TUS, "Upload-Offset": "0", "Content-Type": "text/plain"},
        data=b"a",
        timeout=10,
    )
    assert bad_type.status_code == 415
    no_offset = requests.patch(url, headers={**TUS, "Content-Type": OCTET}, data=b"a", timeout=10)
    assert no_offset.status_code == 400
    for garbage in ["-1", "abc", "1.5", "99999999999999999999999", ""]:
        assert tus.patch(url, garbage, b"a").status_code == 400  # type: ignore[arg-type]
    assert tus.patch(url, 3, b"a").status_code == 409
    assert tus.patch(url, 0, b"abcd").status_code == 204
    conflict = tus.patch(url, 0, b"abcd")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["offset"] == 4
    assert tus.patch(url, 4, b"x" * 7).status_code == 413
    assert tus.head(url).headers["Upload-Offset"] == "4"
    done = tus.patch(url, 4, b"efghij")
    assert done.status_code == 204 and done.headers["Upload-Offset"] == "10"
    assert tus.patch(url, 10, b"k").status_code in (409, 413)
    repeat = tus.patch(url, 10, b"")  # a client re-sending its last PATCH after losing the 204
    assert repeat.status_code == 204 and repeat.headers["Upload-Offset"] == "10"
    assert tus.patch(url, 4, b"").status_code == 409


def test_unknown_upload_is_404(server, tus):
    missing = server.url("/files/AAAAAAAAAAAAAAAAAAAAAA")
    assert tus.head(missing).status_code == 404
    assert tus.patch(missing, 0, b"a").status_code == 404
    assert tus.delete(missing).status_code == 404
    assert requests.get(missing, timeout=10).status_code == 404


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Upload-Length": "10", "Upload-Defer-Length": "1"},
        {"Upload-Length": "-5"},
        {"Upload-Length": "ten"},
        {"Upload-Defer-Length": "2"},
        {"Upload-Length": "10", "Upload-Metadata": "key not-base64!"},
        {"Upload-Length": "10", "Upload-Metadata": "a Zm9v,a YmFy"},
        {"Upload-Length": "10", "Upload-Metadata": "too many parts here"},
        {"Upload-Length": "10", "Upload-Metadata": ",a Zm9v"},
        {"Upload-Length": "10", "Upload-Concat": "bogus"},
        {"Upload-Length": "10", "Upload-Concat": "final;"},
    ],
)
def test_bad_creation_requests(server, headers):
    response = requests.post(server.url("/files/"), headers={**TUS, **headers}, timeout=10)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"]


def test_creation_beyond_max_size_is_413(make_server):
    server = make_server(["--max-upload-size", "1MiB"])
    tus = Tus(server.base)
    assert requests.options(server.url("/files/"), timeout=10).headers["Tus-Max-Size"] == str(MiB)
    assert tus.create(MiB + 1).status_code == 413
    assert tus.create(MiB).status_code == 201


def test_metadata_too_large_is_400(tus):
    response = tus.create(10, headers={"Upload-Metadata": metadata(big="x" * 5000)})
    assert response.status_code == 400


def test_x_http_method_override(tus):
    url = tus.new(3)
    response = requests.post(
        url,
        headers={
            **TUS,
            "X-HTTP-Method-Override": "PATCH",
            "Upload-Offset": "0",
            "Content-Type": OCTET,
        },
        data=b"abc",
        timeout=10,
    )
    assert response.status_code == 204
    assert response.headers["Upload-Offset"] == "3"
    gone = requests.post(url, headers={**TUS, "X-HTTP-Method-Override": "DELETE"}, timeout=10)
    assert gone.status_code == 204
    assert tus.head(url).status_code == 410


# -- extensions -------------------------------------------------------------------------------


def test_creation_with_upload(server, tus):
    data = blob(300_000, seed=2)
    response = tus.create(len(data) + 10, data=data, filename="cwu.bin")
    assert response.status_code == 201
    assert response.headers["Upload-Offset"] == str(len(data))
    url = response.headers["Location"]
    assert tus.patch(url, len(data), b"0123456789").status_code == 204
    assert stored_sha256(server, url) == hashlib.sha256(data + b"0123456789").hexdigest()


@pytest.mark.parametrize(
    ("headers", "data", "status"),
    [
        ({"Content-Type": "text/plain"}, b"abc", 415),
        ({}, b"x" * 11, 413),
        ({"Upload-Checksum": checksum("sha1", b"other")}, b"abc", 460),
        ({"Upload-Checksum": "crc99 AAAA"}, b"abc", 400),
    ],
)
def test_refused_creation_body_creates_nothing(server, tus, headers, data, status):
    records = server.upload_dir / ".upload_server" / "sessions"
    before = set(records.iterdir())
    response = tus.create(10, data=data, headers=headers)
    assert response.status_code == status, response.text
    assert "Location" not in response.headers
    assert response.json()["error"]["code"]
    created = [json.loads(p.read_text()) for p in set(records.iterdir()) - before]
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


def test_deferred_length_cannot_be_changed_or_too_small(tus):
    url = tus.create(headers={"Upload-Defer-Length": "1"}).headers["Location"]
    assert tus.patch(url, 0, b"abcdef", headers={"Upload-Length": "3"}).status_code == 400
    assert tus.patch(url, 0, b"abc", headers={"Upload-Length": "5"}).status_code == 204
    assert tus.patch(url, 3, b"d", headers={"Upload-Length": "9"}).status_code == 400


def test_expiration_header(tus):
    response = tus.create(10)
    assert "GMT" in response.headers["Upload-Expires"]
    patched = tus.patch(response.headers["Location"], 0, b"12345")
    assert "GMT" in patched.headers["Upload-Expires"]


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


@pytest.mark.parametrize("value", ["crc99 AAAA", "sha1 !!!notbase64", "sha1", "sha256 "])
def test_bad_checksum_header_is_400(tus, value):
    url = tus.new(3)
    assert tus.patch(url, 0, b"abc", headers={"Upload-Checksum": value}).status_code == 400
    assert tus.head(url).headers["Upload-Offset"] == "0"


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


def test_concatenation_refusals(server, tus):
    unfinished = tus.create(10, headers={"Upload-Concat": "partial"}).headers["Location"]
    normal = tus.upload(b"abc")
    cases = [
        f"final;{unfinished}",
        f"final;{normal}",
        f"final;{server.url('/files/AAAAAAAAAAAAAAAAAAAAAA')}",
        "final;http://elsewhere.example/other/xyz",
    ]
    for value in cases:
        response = tus.create(headers={"Upload-Concat": value})
        assert response.status_code == 400, (value, response.text)
    with_length = tus.create(5, headers={"Upload-Concat": f"final;{unfinished}"})
    assert with_length.status_code == 400


# -- downloads --------------------------------------------------------------------------------


def test_download_headers_and_ranges(tus):
    data = blob(100_000, seed=6)
    url = tus.upload(data, filename='we"ird ünïcode.png', filetype="image/png")
    full = requests.get(url, timeout=10)
    assert full.status_code == 200
    assert full.content == data
    assert full.headers["Content-Length"] == str(len(data))
    assert full.headers["Content-Type"] == "image/png"
    disposition = full.headers["Content-Disposition"]
    assert disposition.startswith("attachment;") and "filename*=UTF-8''" in disposition
    assert full.headers["Accept-Ranges"] == "bytes"
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert full.headers["Repr-Digest"] == f"sha-256=:{digest}:"

    cases = {
        "bytes=0-9": data[:10],
        "bytes=99990-": data[99990:],
        "bytes=-5": data[-5:],
        "bytes=500-99999999": data[500:],
    }
    for header, expected in cases.items():
        part = requests.get(url, headers={"Range": header}, timeout=10)
        assert part.status_code == 206, header
        assert part.content == expected
        assert part.headers["Content-Range"].endswith(f"/{len(data)}")
    bad = requests.get(url, headers={"Range": "bytes=200000-"}, timeout=10)
    assert bad.status_code == 416
    assert bad.headers["Content-Range"] == f"bytes */{len(data)}"
    ignored = requests.get(url, headers={"Range": "lines=1-2"}, timeout=10)
    assert ignored.status_code == 200 and ignored.content == data


def test_download_if_range_and_version(tus):
    data = blob(1000, seed=9)
    url = tus.upload(data, filename="ranged.bin")
    etag = requests.get(url, timeout=10).headers["ETag"]
    same = requests.get(url, headers={"Range": "bytes=0-9", "If-Range": etag}, timeout=10)
    assert same.status_code == 206 and same.content == data[:10]
    changed = requests.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'}, timeout=10)
    assert changed.status_code == 200 and changed.content == data
    wrong_version = requests.get(url, headers={"Tus-Resumable": "0.2.0"}, timeout=10)
    assert wrong_version.status_code == 412
    assert requests.get(url, headers=TUS, timeout=10).status_code == 200


def test_download_is_named_as_the_client_named_it(server, tus):
    first = tus.upload(b"one", filename="twice.txt")
    second = tus.upload(b"two", filename="twice.txt")
    assert (
        server.status(upload_id(second))["storedAs"] != server.status(upload_id(first))["storedAs"]
    )
    disposition = requests.get(second, timeout=10).headers["Content-Disposition"]
    assert 'filename="twice.txt"' in disposition


def test_download_of_an_incomplete_upload_is_refused(tus):
    url = tus.new(10)
    response = requests.get(url, timeout=10)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "not_complete"


def test_hostile_filetype_is_not_served(tus):
    url = tus.upload(b"<script>", filename="x.html", filetype="text/html\r\nX: y")
    response = requests.get(url, timeout=10)
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


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


def test_cors_preflight_and_exposed_headers(server, tus):
    preflight = requests.options(
        server.url("/files/"),
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "tus-resumable, upload-length, x-app-trace",
        },
        timeout=10,
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] in ("*", "https://app.example")
    assert "PATCH" in preflight.headers["Access-Control-Allow-Methods"]
    allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "upload-offset" in allowed and "tus-resumable" in allowed
    assert "x-app-trace" in allowed  # a client's own headers (tus-js-client `headers:`)
    assert preflight.headers["Tus-Version"] == "1.0.0"  # still a tus OPTIONS
    assert "creation" in preflight.headers["Tus-Extension"]
    created = tus.create(5, headers={"Origin": "https://app.example"})
    exposed = created.headers["Access-Control-Expose-Headers"].lower()
    for name in [
        "location",
        "upload-offset",
        "upload-length",
        "upload-expires",
        "tus-resumable",
        "upload-metadata",
        "tus-version",
    ]:
        assert name in exposed


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


def test_cors_origins_can_be_restricted(make_server):
    server = make_server(["--cors-origins", "https://good.example"])
    good = requests.options(
        server.url("/files/"),
        timeout=10,
        headers={"Origin": "https://good.example", "Access-Control-Request-Method": "PATCH"},
    )
    assert good.headers["Access-Control-Allow-Origin"] == "https://good.example"
    evil = requests.options(
        server.url("/files/"),
        timeout=10,
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "PATCH"},
    )
    assert "Access-Control-Allow-Origin" not in evil.headers


def test_keep_alive_survives_204(server, tus):
    url = tus.new(4)
    session = requests.Session()
    headers = {**TUS, "Content-Type": OCTET}
    first = session.patch(url, headers={**headers, "Upload-Offset": "0"}, data=b"ab", timeout=10)
    assert first.status_code == 204
    assert first.headers.get("Connection", "").lower() != "close"
