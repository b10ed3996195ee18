"""Any one process dying or hanging: the Manager, a writer, the front end (issue 13).

Real servers, real signals. A stopped process is always continued or killed in a `finally`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

from .conftest import MiB, Server, sha256_file, wait_for
from .tus_http import Tus


def readyz(server: Server) -> dict:
    return requests.get(server.url("/readyz"), timeout=10).json()


def writer_of(server: Server, session_id: str) -> int:
    """The index of the writer a session is pinned to, from its durable record."""
    records = server.upload_dir / ".upload_server" / "sessions"
    path = records / f"{session_id}.json"
    if not path.exists():
        path = records / "finished" / f"{session_id}.json"
    return json.loads(path.read_text())["writer"]


class RetryingTus:
    """A tus client that does what a real one does on 503 (wait, HEAD, go on) and on 409, and
    remembers every status it was answered."""

    def __init__(self, server: Server, data: bytes, chunk: int = MiB) -> None:
        self.tus = Tus(server.base)
        self.data = data
        self.chunk = chunk
        self.statuses: list[int] = []
        self.url = self.tus.new(len(data), filename="faults.bin")
        self.session_id = self.url.rsplit("/", 1)[1]

    def offset(self) -> int:
        while True:
            answer = self.tus.head(self.url)
            self.statuses.append(answer.status_code)
            if answer.status_code == 200:
                return int(answer.headers["Upload-Offset"])
            assert answer.status_code == 503, answer.text
            time.sleep(0.2)

    def run(self, deadline: float = 60.0) -> None:
        end = time.monotonic() + deadline
        offset = 0
        while offset < len(self.data):
            assert time.monotonic() < end, "the upload did not finish in time"
            answer = self.tus.patch(self.url, offset, self.data[offset : offset + self.chunk])
            self.statuses.append(answer.status_code)
            if answer.status_code == 204:
                offset = int(answer.headers["Upload-Offset"])
                continue
            assert answer.status_code in (409, 503), (answer.status_code, answer.text)
            if answer.status_code == 503:
                assert answer.headers.get("Retry-After"), answer.headers
                time.sleep(0.2)
            offset = self.offset()


def _watch_status(server: Server, session_ids: list[str], stop: threading.Event) -> list[int]:
    """Poll the status of sessions while something breaks; every answer's status code."""
    seen: list[int] = []

    def run() -> None:
        while not stop.is_set():
            for session_id in session_ids:
                with contextlib.suppress(requests.RequestException):
                    seen.append(
                        requests.get(
                            server.url("/upload/status"),
                            params={"sessionID": session_id},
                            timeout=10,
                        ).status_code
                    )
            time.sleep(0.05)

    threading.Thread(target=run, daemon=True).start()
    return seen


def test_a_killed_manager_is_replaced_and_uploads_complete(make_server, tmp_path):
    server = make_server(["--max-bytes-per-second", "4MiB"])
    seed_data = random.Random(61).randbytes(12 * MiB)
    seed_file = tmp_path / "seed.bin"
    seed_file.write_bytes(seed_data)
    tus_data = random.Random(62).randbytes(10 * MiB)
    client = RetryingTus(server, tus_data, chunk=MiB)
    answer = server.post_file(seed_file)
    assert answer.status_code == 201, answer.text
    seed_id = answer.json()["sessionID"]
    stop = threading.Event()
    seen = _watch_status(server, [seed_id, client.session_id], stop)
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(client.run)
        time.sleep(1.0)  # both are being written (4 MiB/s each)
        before = readyz(server)
        assert server.status(seed_id)["state"] == "writing"
        os.kill(before["managerPid"], signal.SIGKILL)
        killed = time.monotonic()
        healed = wait_for(
            lambda: (
                (r := readyz(server))["managerPid"] not in (None, before["managerPid"])
                and r["ready"]
                and r
            ),
            timeout=20,
            interval=0.05,
        )
        heal_time = time.monotonic() - killed
        upload.result(timeout=60)
    stop.set()
    assert healed["managerRestarts"] == 1
    assert set(healed["writerPids"]).isdisjoint(before["writerPids"])  # writers were restarted
    assert 500 not in seen and 500 not in client.statuses, (seen, client.statuses)
    assert 503 in seen or 503 in client.statuses  # it was noticed, and answered as "try again"
    status = server.wait_state(client.session_id, "completed", timeout=30)
    assert (
        sha256_file(server.upload_dir / status["storedAs"]) == hashlib.sha256(tus_data).hexdigest()
    )
    status = server.wait_state(seed_id, "completed", timeout=30)
    assert (
        sha256_file(server.upload_dir / status["storedAs"]) == hashlib.sha256(seed_data).hexdigest()
    )
    # new uploads work, by both APIs
    fresh = RetryingTus(server, b"after the heal" * 1000)
    fresh.run()
    assert server.wait_state(fresh.session_id, "completed")
    assert server.post_file(seed_file, filename="again.bin").status_code == 201
    print(f"manager healed in {heal_time:.2f}s")
    assert heal_time < 10


def test_a_stopped_writer_is_replaced_and_blocks_no_one(make_server, tmp_path):
    server = make_server(["--writer-stall-timeout", "2s", "--max-bytes-per-second", "4MiB"])
    data = random.Random(63).randbytes(8 * MiB)
    victim = RetryingTus(server, data, chunk=4 * MiB)  # the first session: writer 0
    other = RetryingTus(server, random.Random(64).randbytes(4 * MiB), chunk=256 * 1024)
    assert (writer_of(server, victim.session_id), writer_of(server, other.session_id)) == (0, 1)
    seed_file = tmp_path / "stalled-seed.bin"
    seed_file.write_bytes(random.Random(68).randbytes(12 * MiB))
    answer = server.post_file(seed_file)  # the third session: writer 0 too, a seed drain
    assert answer.status_code == 201, answer.text
    seed_id = answer.json()["sessionID"]
    assert writer_of(server, seed_id) == 0
    queued = []
    while len(queued) < 40:  # sessions pinned to the victim's writer
        url = Tus(server.base).new(64 * 1024, filename="queued.bin")
        if writer_of(server, url.rsplit("/", 1)[1]) == 0:
            queued.append(url)
    pid = readyz(server)["writerPids"][0]
    healthz: list[float] = []
    other_times: list[float] = []
    queued_answers: list[tuple[int, float]] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            began = time.monotonic()
            assert requests.get(server.url("/healthz"), timeout=30).status_code == 200
            healthz.append(time.monotonic() - began)
            time.sleep(0.05)

    def patch_queued(url: str) -> None:
        began = time.monotonic()
        answer = Tus(server.base).patch(url, 0, b"q" * 64 * 1024)
        queued_answers.append((answer.status_code, time.monotonic() - began))

    def timed_other() -> None:
        original = other.tus.patch

        def patch(*args, **kwargs):
            began = time.monotonic()
            try:
                return original(*args, **kwargs)
            finally:
                other_times.append(time.monotonic() - began)

        other.tus.patch = patch
        other.run()

    try:
        with ThreadPoolExecutor(48) as pool:
            upload = pool.submit(victim.run)
            wait_for(lambda: server.status(victim.session_id)["state"] == "writing", timeout=10)
            time.sleep(0.3)
            seed_before = server.status(seed_id)
            os.kill(pid, signal.SIGSTOP)
            stopped = time.monotonic()
            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            answers = [pool.submit(patch_queued, url) for url in queued]
            others = pool.submit(timed_other)
            for answer in answers:
                answer.result(timeout=30)
            others.result(timeout=60)
            wait_for(lambda: readyz(server)["writerStalls"] >= 1, timeout=20, interval=0.05)
            replaced = time.monotonic() - stopped
            ready = wait_for(lambda: (r := readyz(server))["ready"] and r, timeout=20)
            upload.result(timeout=60)
            stop.set()
            prober.join(10)
        assert pid not in ready["writerPids"]
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        status = server.wait_state(victim.session_id, "completed", timeout=30)
        stored = server.upload_dir / status["storedAs"]
        assert sha256_file(stored) == hashlib.sha256(data).hexdigest()
        assert server.wait_state(other.session_id, "completed")
        assert seed_before["state"] == "writing", seed_before  # it was being copied when stopped
        status = server.wait_state(seed_id, "completed", timeout=30)
        assert sha256_file(server.upload_dir / status["storedAs"]) == sha256_file(seed_file)
        codes = [code for code, _ in queued_answers]
        assert set(codes) <= {204, 503}, codes
        assert 500 not in victim.statuses and 503 in victim.statuses, victim.statuses
        slowest_queued = max(t for _, t in queued_answers)
        print(
            f"writer replaced after {replaced:.2f}s; /healthz max {max(healthz) * 1000:.0f}ms "
            f"({len(healthz)} probes); other writer's PATCH max {max(other_times) * 1000:.0f}ms; "
            f"40 queued PATCHes answered {codes.count(503)}x503 {codes.count(204)}x204, "
            f"slowest {slowest_queued:.2f}s"
        )
        assert max(healthz) < 1.5, healthz
        assert max(other_times) < 2.0, other_times
        assert slowest_queued < 2.5
    finally:
        stop.set()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_slow_rate_limited_patch_is_not_a_stall(make_server):
    """A rate limit's sleeps are progress: 1 MiB chunks at 384 KiB/s sleep 2.7s between chunks,
    longer than the stall timeout, and the PATCH is still answered 204."""
    server = make_server(["--writer-stall-timeout", "1s", "--max-bytes-per-second", "384KiB"])
    data = random.Random(65).randbytes(3 * MiB)
    tus = Tus(server.base)
    url = tus.new(len(data), filename="slow.bin")
    began = time.monotonic()
    answer = tus.patch(url, 0, data)
    assert answer.status_code == 204, answer.text
    assert time.monotonic() - began > 5  # it really was slow
    assert readyz(server)["writerStalls"] == 0


def test_front_end_death_leaves_no_process_and_a_restart_recovers(make_server, tmp_path):
    server = make_server(["--max-bytes-per-second", "2MiB"])
    data = random.Random(66).randbytes(3 * MiB)
    tus = Tus(server.base)
    url = tus.new(len(data), filename="front.bin")
    assert tus.patch(url, 0, data[: 2 * MiB]).status_code == 204
    seed_file = tmp_path / "front-seed.bin"
    seed_file.write_bytes(random.Random(67).randbytes(6 * MiB))
    seed_id = server.post_file(seed_file).json()["sessionID"]
    children = server.family()[1:]
    assert len(children) >= 3  # the Manager and two writers
    server.proc.kill()  # the front end alone
    server.proc.wait()
    began = time.monotonic()
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, alive
    print(f"{len(children)} helper processes gone {time.monotonic() - began:.2f}s after the kill")
    again = make_server(upload_dir=server.upload_dir, port=server.port)
    tus = Tus(again.base)
    assert int(tus.head(url).headers["Upload-Offset"]) == 2 * MiB
    assert tus.patch(url, 2 * MiB, data[2 * MiB :]).status_code == 204
    status = again.wait_state(url.rsplit("/", 1)[1], "completed")
    assert sha256_file(again.upload_dir / status["storedAs"]) == hashlib.sha256(data).hexdigest()
    status = again.wait_state(seed_id, "completed", timeout=30)
    assert sha256_file(again.upload_dir / status["storedAs"]) == sha256_file(seed_file)


HEAL_FAILS = """
import os, signal, sys, time
from multiprocessing.managers import SyncManager
from upload_server.config import Config
from upload_server.hooks import Hooks
from upload_server.runtime import Runtime

config = Config.load(["--upload-dir", sys.argv[1], "--writers", "1"], environ={})
runtime = Runtime(config, Hooks(config)).start()

def refuse(self, *args, **kwargs):
    raise OSError("no new Manager today")

SyncManager.start = refuse
os.kill(runtime.manager._process.pid, signal.SIGKILL)
time.sleep(20)
sys.exit(0)  # not reached: the server exits as soon as it cannot heal
"""


def test_a_server_that_cannot_heal_exits_non_zero(tmp_path):
    """Exiting is what lets a supervisor (systemd, a PaaS) start it again."""
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", HEAL_FAILS, str(tmp_path / "uploads")],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 70, done.stderr
    assert "could not be restarted" in done.stderr
    assert time.monotonic() - began < 15


def test_a_writer_continued_before_the_stall_timeout_skips_what_was_answered_503(make_server):
    """SIGSTOP then SIGCONT: the writer is used again, not killed, and the append its client was
    told failed (503) is not applied behind the client's back over the body it re-sent."""
    server = make_server(["--writer-stall-timeout", "30s", "--writers", "1"])
    data = random.Random(69).randbytes(2 * MiB)
    tus = Tus(server.base)
    url = tus.new(len(data), filename="continued.bin")
    session_id = url.rsplit("/", 1)[1]
    pid = readyz(server)["writerPids"][0]
    os.kill(pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        first = tus.patch(url, 0, data[: MiB + 123])  # sent to the stopped writer, then let go
        assert first.status_code == 503, first.text
        assert first.headers["Retry-After"]
        assert time.monotonic() - began < 2
        again = tus.patch(url, 0, data[:MiB])  # refused at once: not sent
        assert again.status_code == 503
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: readyz(server)["ready"], timeout=10)
    time.sleep(0.5)  # the writer has read its inbox
    status = server.status(session_id)
    assert status["state"] == "waiting" and status["bytesWritten"] == 0, status
    assert tus.patch(url, 0, data[: MiB // 2]).status_code == 204
    assert tus.patch(url, MiB // 2, data[MiB // 2 :]).status_code == 204
    status = server.wait_state(session_id, "completed")
    assert sha256_file(server.upload_dir / status["storedAs"]) == hashlib.sha256(data).hexdigest()
    ready = readyz(server)
    assert ready["writerPids"] == [pid] and ready["writerStalls"] == 0
    assert "refused while this writer was stopped" in server.log()


def test_a_replacement_writer_holds_no_client_connection(make_server):
    """A writer forked while clients are connected closes its copies of their sockets: a
    connection the server closes must not stay half-open in a writer."""
    import socket

    server = make_server()
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        before = readyz(server)["writerPids"]
        os.kill(before[0], signal.SIGKILL)
        after = wait_for(
            lambda: (r := readyz(server))["ready"] and before[0] not in r["writerPids"] and r
        )
        replacement = next(pid for pid in after["writerPids"] if pid not in before)
        held = psutil.Process(replacement).net_connections(kind="inet")
        assert held == [], held
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.recv(1024).startswith(b"HTTP/1.1 200")
