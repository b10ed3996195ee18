"""The seed API against a real server: byte-identical files, pause, resume, terminate, bad input."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import pytest
import requests

from .conftest import MiB, sha256_file, wait_for


def upload_and_wait(server, path: Path, filename: str | None = None) -> dict:
    response = server.post_file(path, filename)
    assert response.status_code == 201, response.text
    session_id = response.json()["sessionID"]
    return server.wait_state(session_id, "completed", "failed")


@pytest.mark.parametrize("size", [0, 1, MiB, MiB + 1, 50 * MiB])
def test_upload_is_byte_identical(server, files, size):
    source = files(size, seed=size)
    status = upload_and_wait(server, source)
    assert status["completed"] is True
    assert status["state"] == "completed"
    assert status["error"] is None
    assert status["bytesWritten"] == status["totalBytes"] == size
    assert status["totalChunks"] == -(-size // MiB)
    assert status["uploadedChunks"] == status["totalChunks"]
    assert status["paused"] is False and status["terminated"] is False
    stored = server.upload_dir / status["storedAs"]
    assert sha256_file(stored) == sha256_file(source) == status["sha256"]


def test_create_answers_201_with_an_unguessable_session_id(server, files):
    response = server.post_file(files(10))
    assert response.status_code == 201
    assert response.headers["Content-Type"].startswith("application/json")
    session_id = response.json()["sessionID"]
    assert len(session_id) >= 22  # 128 bits in URL-safe base64
    assert all(c.isalnum() or c in "-_" for c in session_id)
    other = server.post_file(files(10)).json()["sessionID"]
    assert other != session_id


def test_existing_file_is_never_overwritten(server, files):
    first = upload_and_wait(server, files(100, seed=1), filename="same.txt")
    second = upload_and_wait(server, files(200, seed=2), filename="same.txt")
    assert first["storedAs"] == "same.txt"
    assert second["storedAs"] != "same.txt"
    assert (server.upload_dir / "same.txt").stat().st_size == 100
    assert (server.upload_dir / second["storedAs"]).stat().st_size == 200


def test_several_files_in_one_post_make_one_session_each(server, files):
    a, b = files(1000, seed=3), files(MiB + 5, seed=4)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        response = requests.post(
            server.url("/upload"),
            files=[("file", ("a.bin", fa)), ("file", ("b.bin", fb))],
            timeout=60,
        )
    assert response.status_code == 201, response.text
    body = response.json()
    assert len(body["sessionIDs"]) == 2
    assert body["sessionID"] == body["sessionIDs"][0]
    for session_id, source in zip(body["sessionIDs"], (a, b), strict=True):
        status = server.wait_state(session_id, "completed")
        assert sha256_file(server.upload_dir / status["storedAs"]) == sha256_file(source)


def test_twenty_concurrent_sessions_are_byte_identical(server, files):
    sources = [files(MiB * (i % 4) + i * 1000, seed=100 + i) for i in range(20)]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda p: upload_and_wait(server, p), sources))
    names = set()
    for source, status in zip(sources, results, strict=True):
        assert status["state"] == "completed", status
        assert sha256_file(server.upload_dir / status["storedAs"]) == sha256_file(source)
        names.add(status["storedAs"])
    assert len(names) == 20


# -- pause, resume, terminate -----------------------------------------------------------------


@pytest.fixture
def slow_server(make_server):
    """Writers limited to 1 MiB/s, so an upload takes seconds and can be paused mid-way."""
    return make_server(["--max-bytes-per-second", "1MiB"])


def _start_slow_upload(server, files, size=6 * MiB):
    source = files(size, seed=size)
    response = server.post_file(source)
    assert response.status_code == 201
    session_id = response.json()["sessionID"]
    wait_for(lambda: server.status(session_id)["uploadedChunks"] >= 1)
    return source, session_id


def test_pause_holds_and_resume_completes(slow_server, files):
    server = slow_server
    source, session_id = _start_slow_upload(server, files)
    paused = requests.get(server.url("/upload/pause"), params={"sessionID": session_id}, timeout=30)
    assert paused.status_code == 200, paused.text
    assert paused.json()["paused"] is True
    held_at = server.status(session_id)["uploadedChunks"]
    time.sleep(1.5)
    status = server.status(session_id)
    assert status["uploadedChunks"] == held_at
    assert status["paused"] is True and status["state"] == "paused"
    assert held_at < status["totalChunks"]

    resumed = requests.post(
        server.url("/upload/resume"), params={"sessionID": session_id}, timeout=30
    )
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["paused"] is False
    status = server.wait_state(session_id, "completed")
    assert sha256_file(server.upload_dir / status["storedAs"]) == sha256_file(source)


def _resend_and_finish(server, session_id: str, source) -> None:
    """Resume by sending the file again; the stored file must be byte-identical."""
    resumed = server.resume_file(session_id, source)
    assert resumed.status_code == 200, resumed.text
    status = server.wait_state(session_id, "completed")
    assert sha256_file(server.upload_dir / status["storedAs"]) == sha256_file(source)


def test_a_spool_removed_while_its_writer_runs_waits_for_the_file(slow_server, files):
    server = slow_server
    source, session_id = _start_slow_upload(server, files, size=3 * MiB)
    (server.upload_dir / ".upload_server" / "spool" / f"{session_id}.spool").unlink()
    status = server.wait_state(session_id, "waiting", "failed", timeout=60)
    assert status["state"] == "waiting" and status["error"]["code"] == "spool_missing", status
    assert status["bytesWritten"] == 0 and status["completed"] is False
    _resend_and_finish(server, session_id, source)


def test_resume_by_resending_the_file_after_the_spool_is_gone(slow_server, files):
    server = slow_server
    source, session_id = _start_slow_upload(server, files)
    assert (
        requests.get(
            server.url("/upload/pause"), params={"sessionID": session_id}, timeout=30
        ).status_code
        == 200
    )
    spool = server.upload_dir / ".upload_server" / "spool" / f"{session_id}.spool"
    spool.unlink()

    bare = requests.post(server.url("/upload/resume"), params={"sessionID": session_id}, timeout=30)
    assert bare.status_code == 409
    assert bare.json()["error"]["code"] == "spool_missing"

    _resend_and_finish(server, session_id, source)


def test_resume_with_a_file_of_another_size_is_refused(slow_server, files):
    server = slow_server
    _, session_id = _start_slow_upload(server, files)
    requests.get(server.url("/upload/pause"), params={"sessionID": session_id}, timeout=30)
    response = server.resume_file(session_id, files(1234))
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "size_mismatch"
    assert "1234" in response.json()["error"]["message"]
    assert "size" in response.json()["error"]["message"]
    assert server.status(session_id)["paused"] is True
    no_file = requests.post(
        server.url("/upload/resume"),
        params={"sessionID": session_id},
        files={"other": ("o.txt", b"not the file")},
        timeout=30,
    )
    assert no_file.status_code == 400 and no_file.json()["error"]["code"] == "missing_file"
    assert server.status(session_id)["paused"] is True


@pytest.mark.parametrize("how", ["terminate", "delete"])
def test_terminate_removes_partial_data_and_spool(slow_server, files, how):
    server = slow_server
    _, session_id = _start_slow_upload(server, files)
    params = {"sessionID": session_id}
    if how == "terminate":
        response = requests.post(server.url("/upload/terminate"), params=params, timeout=30)
    else:
        response = requests.delete(server.url("/upload"), params=params, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["terminated"] is True
    status = server.status(session_id)
    assert status["terminated"] is True and status["state"] == "terminated"
    internal = server.upload_dir / ".upload_server"
    assert not list((internal / "partial").glob(f"{session_id}*"))
    assert not list((internal / "spool").glob(f"{session_id}*"))
    assert not [p for p in server.upload_dir.iterdir() if p.name != ".upload_server"]


# -- bad input --------------------------------------------------------------------------------


def assert_error(response: requests.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    assert "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code
    return error


def test_a_body_far_past_the_limit_is_refused_by_waitress_as_json(make_server, files):
    server = make_server(["--max-upload-size", "1MiB"])
    big = files(3 * MiB)  # past the limit and the multipart allowance: refused on its headers
    with open(big, "rb") as handle:
        response = requests.post(server.url("/upload"), files={"file": ("big", handle)}, timeout=30)
    assert_error(response, 413)


@pytest.mark.parametrize(
    "hostile,expected",
    [
        ("../../etc/passwd", "passwd"),
        ("/etc/shadow", "shadow"),
        ("..\\..\\windows\\system32\\evil.dll", "evil.dll"),
        ("CON", "_CON"),
        ("nul.txt", "_nul.txt"),
        ("", None),
        ("..", None),
        (".hidden", "hidden"),
        ("a\x00b.txt", "a_b.txt"),
        ("x" * 400 + ".txt", None),
    ],
)
def test_hostile_filenames_stay_inside_the_upload_dir(server, files, hostile, expected):
    source = files(10, seed=7)
    with open(source, "rb") as handle:
        response = requests.post(
            server.url("/upload"), files={"file": (hostile, handle)}, timeout=30
        )
    assert response.status_code == 201, response.text
    status = server.wait_state(response.json()["sessionID"], "completed")
    stored = status["storedAs"]
    assert "/" not in stored and "\\" not in stored and "\x00" not in stored
    assert not stored.startswith(".")
    assert len(stored.encode()) <= 255
    path = server.upload_dir / stored
    assert path.resolve().parent == server.upload_dir.resolve()
    assert sha256_file(path) == sha256_file(source)
    if expected is not None:
        assert stored.startswith(expected.rsplit(".", 1)[0])
