"""Lose nothing: SIGKILL of the server and of writers, expiry, full disks, graceful shutdown."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from tusclient import client as tus_client
from tusclient.storage.filestorage import FileStorage

from upload_server import portable

from .conftest import MiB, Server, make_file, sha256_file, wait_for
from .test_operations import metric
from .test_security import Receiver
from .tus_http import Tus

RATE = "4MiB"  # per session, so uploads are in flight when the kill comes


class TusJob:
    """A tuspy client that uploads chunk by chunk and remembers what the server acknowledged."""

    def __init__(self, path: Path, urls: Path) -> None:
        self.path = path
        self.storage = FileStorage(str(urls))
        self.acked = 0
        self.url: str | None = None

    def uploader(self, base: str):
        return tus_client.TusClient(base + "/files/").uploader(
            str(self.path),
            chunk_size=MiB,
            store_url=True,
            url_storage=self.storage,
            metadata={"filename": self.path.name},
        )

    def run(self, base: str) -> None:
        with contextlib.suppress(Exception):  # the server is killed under it
            uploader = self.uploader(base)
            while uploader.offset < self.path.stat().st_size or not uploader.url:
                uploader.upload_chunk()
                self.url, self.acked = uploader.url, uploader.offset

    def finish(self, server: Server) -> Path:
        uploader = self.uploader(server.base)
        if uploader.url:
            # nothing the server acknowledged before the crash is lost
            assert uploader.offset >= self.acked, (uploader.offset, self.acked)
        uploader.upload()
        status = server.wait_state(uploader.url.rsplit("/", 1)[1], "completed")
        return server.upload_dir / status["storedAs"]


class SeedJob:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.session_id: str | None = None

    def run(self, base: str) -> None:
        with contextlib.suppress(Exception), open(self.path, "rb") as handle:
            response = requests.post(
                base + "/upload", files={"file": (self.path.name, handle)}, timeout=60
            )
            if response.status_code == 201:
                self.session_id = response.json()["sessionID"]

    def finish(self, server: Server) -> Path:
        if self.session_id is None:  # never acknowledged: the client starts again
            self.run(server.base)
        # acknowledged: the spool survived the crash, so the upload finishes by itself
        status = server.wait_state(self.session_id, "completed", "waiting")
        assert status["state"] == "completed", status
        return server.upload_dir / status["storedAs"]


@pytest.mark.parametrize("kill_point", range(10))
def test_sigkill_of_the_server_loses_nothing(make_server, tmp_path, kill_point):
    rng = random.Random(1000 + kill_point)
    args = ["--max-bytes-per-second", RATE]
    server = make_server(args)
    jobs: list[TusJob | SeedJob] = []
    for i in range(5):
        path = make_file(tmp_path / f"crash-{i}.bin", rng.randint(2 * MiB, 9 * MiB), seed=i)
        jobs.append(SeedJob(path) if i < 2 else TusJob(path, tmp_path / f"urls-{i}.json"))
    threads = [threading.Thread(target=job.run, args=(server.base,)) for job in jobs]
    for thread in threads:
        thread.start()
    time.sleep(rng.uniform(0.2, 2.0))
    server.kill()
    for thread in threads:
        thread.join(60)

    again = make_server(args, upload_dir=server.upload_dir, port=server.port)
    for job in jobs:
        assert sha256_file(job.finish(again)) == sha256_file(job.path)


def test_paused_sessions_stay_paused_across_a_crash(make_server, files):
    server = make_server(["--max-bytes-per-second", "1MiB"])
    source = files(4 * MiB, seed=31)
    session_id = server.post_file(source).json()["sessionID"]
    wait_for(lambda: server.status(session_id)["uploadedChunks"] >= 1)
    requests.get(server.url("/upload/pause"), params={"sessionID": session_id}, timeout=10)
    written = server.status(session_id)["bytesWritten"]
    server.kill()
    again = make_server(upload_dir=server.upload_dir)
    status = again.status(session_id)
    assert status["paused"] is True and status["bytesWritten"] == written
    time.sleep(1)
    assert again.status(session_id)["bytesWritten"] == written
    requests.post(again.url("/upload/resume"), params={"sessionID": session_id}, timeout=10)
    status = again.wait_state(session_id, "completed")
    assert sha256_file(again.upload_dir / status["storedAs"]) == sha256_file(source)


def test_graceful_shutdown_resumes_exactly_where_it_stopped(make_server, files):
    server = make_server(["--max-bytes-per-second", "2MiB"])
    source = files(8 * MiB, seed=32)
    session_id = server.post_file(source).json()["sessionID"]
    wait_for(lambda: server.status(session_id)["uploadedChunks"] >= 2)
    assert server.stop(signal.SIGTERM) == 0
    record = server.upload_dir / ".upload_server" / "sessions" / f"{session_id}.json"
    import json

    saved = json.loads(record.read_text())
    assert saved["bytes_written"] > 0
    internal = server.upload_dir / ".upload_server"
    if saved["spooled"]:  # the spool, whole, is to become the data: it holds the counted bytes
        assert (internal / "spool" / f"{session_id}.spool").stat().st_size == source.stat().st_size
    else:
        assert (internal / "partial" / session_id).stat().st_size == saved["bytes_written"]
    again = make_server(upload_dir=server.upload_dir)
    assert again.status(session_id)["bytesWritten"] >= saved["bytes_written"]
    status = again.wait_state(session_id, "completed")
    assert sha256_file(again.upload_dir / status["storedAs"]) == sha256_file(source)


def test_sigkill_of_a_writer(make_server, tmp_path):
    server = make_server(["--max-bytes-per-second", RATE])
    jobs = [
        TusJob(
            make_file(tmp_path / f"w{i}.bin", 6 * MiB, seed=40 + i), tmp_path / f"wurls-{i}.json"
        )
        for i in range(2)
    ]
    seed = SeedJob(make_file(tmp_path / "seed.bin", 6 * MiB, seed=49))
    threads = [threading.Thread(target=j.run, args=(server.base,)) for j in [*jobs, seed]]
    for thread in threads:
        thread.start()
    time.sleep(0.8)
    before = server.writer_pids()
    os.kill(before[0], signal.SIGKILL)
    for thread in threads:
        thread.join(60)
    ready = wait_for(
        lambda: (r := requests.get(server.url("/readyz"), timeout=5).json())["ready"] and r
    )
    assert ready["writersAlive"] == ready["writers"] == 2
    assert ready["writerRestarts"] >= 1
    assert before[0] not in ready["writerPids"]
    for job in [*jobs, seed]:
        assert sha256_file(job.finish(server)) == sha256_file(job.path)


def test_abandoned_uploads_expire_and_active_ones_do_not(make_server, files):
    server = make_server(["--expiry", "2s"])
    tus = Tus(server.base)
    abandoned = tus.new(10 * MiB, filename="abandoned.bin")
    assert tus.patch(abandoned, 0, b"x" * MiB).status_code == 204
    abandoned_id = abandoned.rsplit("/", 1)[1]
    internal = server.upload_dir / ".upload_server"
    orphan = internal / "spool" / "orphan-from-a-crash.seg"
    orphan.write_bytes(b"junk")
    os.utime(orphan, (time.time() - 3600, time.time() - 3600))
    assert (internal / "partial" / abandoned_id).exists()

    active = tus.new(12, filename="active.bin")
    for i in range(10):  # 5 seconds of activity, longer than the expiry
        assert tus.patch(active, i, b"a").status_code == 204
        time.sleep(0.5)
    assert tus.patch(active, 10, b"bb").status_code == 204

    assert tus.head(abandoned).status_code == 410
    gone = requests.get(
        server.url("/upload/status"), params={"sessionID": abandoned_id}, timeout=10
    )
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] in ("session_expired", "unknown_session")
    assert not (internal / "partial" / abandoned_id).exists()
    assert not (internal / "sessions" / f"{abandoned_id}.json").exists()
    assert (internal / "sessions" / "finished" / f"{abandoned_id}.json").exists()
    assert not orphan.exists()
    assert server.status(active.rsplit("/", 1)[1])["completed"] is True


def test_full_disk_fails_the_session_cleanly(small_disk, make_server, files):
    # --min-free-space 0: no reserve check, so the writer itself runs into ENOSPC
    server = make_server(["--min-free-space", "0"], upload_dir=small_disk / "uploads")
    tus = Tus(server.base)
    data = random.Random(5).randbytes(30 * MiB)
    created = tus.create(
        headers={"Upload-Defer-Length": "1", "Upload-Metadata": "filename dG9vYmlnLmJpbg=="}
    )
    url = created.headers["Location"]
    session_id = url.rsplit("/", 1)[1]
    # a body is waitress's buffer linked into the spool, then copied into the data (two copies
    # on the disk at once); portable mode copies the buffer into the spool (three): smaller
    # pieces then, so the first one fits and the writer still meets the full disk later
    piece = 6 * MiB if portable.active() else 10 * MiB
    offset, failure = 0, None
    while offset < len(data):
        response = tus.patch(url, offset, data[offset : offset + piece])
        if response.status_code != 204:
            failure = response
            break
        offset = int(response.headers["Upload-Offset"])
    assert failure is not None and failure.status_code == 507, failure.text + server.log()
    assert failure.json()["error"]["code"] == "disk_full"
    status = server.status(session_id)
    assert status["state"] == "failed" and status["error"]["code"] == "disk_full"
    assert status["completed"] is False and status["storedAs"] is None
    written = int(tus.head(url).headers["Upload-Offset"])
    assert written == status["bytesWritten"] == offset > 0
    partial = server.upload_dir / ".upload_server" / "partial" / session_id
    assert partial.stat().st_size == written  # no byte counted that was not written
    assert partial.read_bytes() == data[:written]
    assert [p.name for p in server.upload_dir.iterdir()] == [".upload_server"]

    # a body that cannot even be received (waitress buffers bodies on the upload disk) is
    # refused with 507, and nothing is left behind
    refused = server.post_file(files(30 * MiB, seed=61))
    assert refused.status_code == 507, refused.text
    assert refused.json()["error"]["code"] == "disk_full"
    assert not list((server.upload_dir / ".upload_server" / "spool").iterdir())

    # the server goes on: terminate the failed upload to free its space, upload something else
    assert tus.delete(url).status_code == 204
    small = random.Random(6).randbytes(MiB)
    small_url = tus.upload(small, filename="fits.bin")
    assert server.status(small_url.rsplit("/", 1)[1])["completed"] is True
    assert (server.upload_dir / "fits.bin").read_bytes() == small
    seed = server.post_file(files(2 * MiB, seed=62))
    assert server.wait_state(seed.json()["sessionID"], "completed")["completed"] is True


def test_free_space_reserve_refuses_uploads_up_front(make_server, files):
    server = make_server(["--min-free-space", "1000TB"])
    tus = Tus(server.base)
    refused = tus.create(MiB)
    assert refused.status_code == 507
    assert refused.json()["error"]["code"] == "insufficient_storage"
    assert server.post_file(files(1000)).status_code == 507
    assert not list((server.upload_dir / ".upload_server" / "sessions").glob("**/*.json"))
    ready = requests.get(server.url("/readyz"), timeout=10)
    assert ready.status_code == 503 and "reserve" in ready.json()["problems"][0]

    # refused on its headers: no `100 Continue`, and not one byte of the body read
    with socket.create_connection((server.host, server.port), timeout=10) as raw:
        raw.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5242880\r\n\r\n"
        )
        answer = b""
        while chunk := raw.recv(65536):  # the server closes after a refusal
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 507 "), answer
    assert '"insufficient_storage"' in answer


@pytest.mark.parametrize("policy", ["always", "never"])
def test_fsync_policies_store_the_same_bytes(make_server, files, policy):
    server = make_server(["--fsync", policy])
    source = files(3 * MiB + 7, seed=50)
    session_id = server.post_file(source).json()["sessionID"]
    status = server.wait_state(session_id, "completed")
    assert sha256_file(server.upload_dir / status["storedAs"]) == sha256_file(source)
    tus = Tus(server.base)
    data = random.Random(7).randbytes(2 * MiB)
    url = tus.upload(data)
    assert requests.get(url, timeout=10).content == data


@pytest.mark.parametrize("moment", ["noted", "linked", "unlinked"])
def test_a_crash_while_publishing_is_finished_at_restart(make_server, files, moment):
    """Publishing writes its target down first: wherever a crash stops it, a restart finishes it,
    and completes it as a writer would (the post-finish hook and the metric fire once)."""
    import json

    server = make_server()
    source = files(3 * MiB + 5, seed=80)
    session_id = server.post_file(source, filename="pub.bin").json()["sessionID"]
    name = server.wait_state(session_id, "completed")["storedAs"]
    server.stop()
    internal = server.upload_dir / ".upload_server"
    published, partial = server.upload_dir / name, internal / "partial" / session_id
    if moment == "noted":  # the note is on disk, the link not made: the data is still partial
        os.replace(published, partial)
    elif moment == "linked":  # linked into place, the partial name not yet removed
        os.link(published, partial)
    record_path = internal / "sessions" / f"{session_id}.json"
    finished = internal / "sessions" / "finished" / f"{session_id}.json"
    record = json.loads(finished.read_text())  # a crash comes before it was filed as finished
    finished.unlink()
    record.update(state="writing", publishing=name, location=None)
    record_path.write_text(json.dumps(record))

    receiver = Receiver()
    try:
        hook = ["--hook-url", f"http://127.0.0.1:{receiver.port}/hook"]
        again = make_server(hook, upload_dir=server.upload_dir)
        status = again.status(session_id)
        assert status["state"] == "completed" and status["storedAs"] == name
        assert sha256_file(again.upload_dir / name) == sha256_file(source) == status["sha256"]
        assert not partial.exists()
        # completed once, whichever process finished it: the hook and the metric fire once
        wait_for(lambda: receiver.of("post-finish"))
        time.sleep(0.3)  # nothing more comes
        finished = receiver.of("post-finish")
        assert [payload["upload"]["sessionID"] for payload in finished] == [session_id]
        text = requests.get(again.url("/metrics"), timeout=10).text
        assert metric(text, "upload_server_uploads_completed_total", protocol="seed") == 1
    finally:
        receiver.httpd.shutdown()


def test_a_crash_after_the_spool_became_the_data_is_finished_at_restart(make_server, files):
    """The whole spool was renamed into the data, then the server died before publishing."""
    import json

    server = make_server()
    source = files(2 * MiB + 9, seed=81)
    session_id = server.post_file(source, filename="renamed.bin").json()["sessionID"]
    name = server.wait_state(session_id, "completed")["storedAs"]
    server.stop()
    internal = server.upload_dir / ".upload_server"
    os.replace(server.upload_dir / name, internal / "partial" / session_id)
    record_path = internal / "sessions" / f"{session_id}.json"
    finished = internal / "sessions" / "finished" / f"{session_id}.json"
    record = json.loads(finished.read_text())  # a crash comes before it was filed as finished
    finished.unlink()
    record.update(state="writing", spooled=True, bytes_written=MiB, location=None, sha256=None)
    record_path.write_text(json.dumps(record))

    again = make_server(upload_dir=server.upload_dir)
    status = again.wait_state(session_id, "completed", "waiting")
    assert status["state"] == "completed", status
    assert (
        sha256_file(again.upload_dir / status["storedAs"])
        == sha256_file(source)
        == status["sha256"]
    )


def _patch_in_background(tus: Tus, url: str, data: bytes) -> threading.Thread:
    """A PATCH whose answer the test does not wait for (the server may die under it)."""

    def send() -> None:
        with contextlib.suppress(requests.RequestException):
            tus.patch(url, 0, data)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_a_counted_segment_is_replayed_after_a_crash(make_server):
    """A PATCH body named in the record counts before it is copied: after a SIGKILL mid-copy the
    restarted server copies it from the spool, and the offset never goes back."""
    data = random.Random(51).randbytes(6 * MiB)
    server = make_server(["--max-bytes-per-second", "2MiB"])
    tus = Tus(server.base)
    url = tus.new(len(data), filename="replayed.bin")
    session_id = url.rsplit("/", 1)[1]
    thread = _patch_in_background(tus, url, data[: 4 * MiB])
    counted = wait_for(lambda: int(tus.head(url).headers["Upload-Offset"]) or None, timeout=10)
    assert counted == 4 * MiB
    time.sleep(0.6)  # the writer is part way through copying it (2 MiB/s)
    segment = server.upload_dir / ".upload_server" / "spool" / f"{session_id}.0.seg"
    assert segment.exists()
    server.kill()
    thread.join(10)
    again = make_server(upload_dir=server.upload_dir, port=server.port)
    assert int(Tus(again.base).head(url).headers["Upload-Offset"]) == 4 * MiB
    wait_for(lambda: not segment.exists(), timeout=20)  # replayed into the data, then removed
    assert again.status(session_id)["state"] == "waiting"
    answer = Tus(again.base).patch(url, 4 * MiB, data[4 * MiB :])
    assert answer.status_code == 204, answer.text
    status = again.wait_state(session_id, "completed")
    assert sha256_file(again.upload_dir / status["storedAs"]) == hashlib.sha256(data).hexdigest()


def test_a_writer_killed_while_copying_a_segment_still_answers_the_patch(make_server):
    data = random.Random(52).randbytes(4 * MiB)
    server = make_server(["--max-bytes-per-second", "2MiB", "--writers", "1"])
    tus = Tus(server.base)
    url = tus.new(len(data), filename="writer-killed.bin")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(tus.patch, url, 0, data)
        wait_for(lambda: int(tus.head(url).headers["Upload-Offset"]) == len(data), timeout=10)
        time.sleep(0.5)
        os.kill(server.writer_pids()[0], signal.SIGKILL)
        assert answer.result(timeout=60).status_code == 204
    status = server.wait_state(url.rsplit("/", 1)[1], "completed")
    assert sha256_file(server.upload_dir / status["storedAs"]) == hashlib.sha256(data).hexdigest()


def test_finished_sessions_leave_the_live_view_and_answer_from_their_records(make_server, files):
    """With a tiny --live-grace a finished upload leaves the Manager dict within a sweep or two;
    its status is the same field by field, it downloads, its tus DELETE still reaches its writer,
    and a restart does not bring it back into the live view."""
    server = make_server(["--live-grace", "0.2s"])
    tus = Tus(server.base)
    data = b"evicted but answering" * 100
    url = tus.new(len(data), filename="evicted.bin")
    assert tus.patch(url, 0, data).status_code == 204
    upload_id = url.rsplit("/", 1)[1]
    seed_id = server.post_file(files(1000, seed=5)).json()["sessionID"]
    before = server.wait_state(seed_id, "completed")
    readyz = server.url("/readyz")
    wait_for(lambda: requests.get(readyz, timeout=5).json()["sessions"] == 0)
    assert server.status(seed_id) == before
    download = requests.get(server.url(f"/files/{upload_id}"), timeout=10)
    assert download.status_code == 200 and download.content == data
    assert tus.head(url).headers["Upload-Offset"] == str(len(data))
    assert requests.delete(url, headers={"Tus-Resumable": "1.0.0"}, timeout=10).status_code == 204
    assert tus.head(url).status_code == 410
    server.stop()
    server.start()
    assert requests.get(readyz, timeout=5).json()["sessions"] == 0
    assert server.status(seed_id) == before
    assert tus.head(url).status_code == 410
