"""Process life cycle: start-up, settings, shutdown without orphans, waitress-serve, dir lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest
import requests

from .conftest import ROOT, MiB, Server, free_port, sha256_file, wait_for


def _gone(pids: list[int]) -> bool:
    return not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_leaves_no_orphans(make_server, files, sig):
    server = make_server()
    response = server.post_file(files(3 * MiB))
    assert response.status_code == 201
    pids = [p.pid for p in server.family()]
    assert len(pids) >= 4  # front end, Manager, two writers
    assert server.stop(sig) == 0
    wait_for(lambda: _gone(pids), timeout=15)


def test_sessions_survive_a_clean_restart(make_server, files, tmp_path):
    server = make_server(["--max-bytes-per-second", "2MiB"])
    source = files(6 * MiB, seed=9)
    session_id = server.post_file(source).json()["sessionID"]
    wait_for(lambda: server.status(session_id)["uploadedChunks"] >= 1)
    server.stop()
    again = make_server(upload_dir=server.upload_dir)
    status = again.wait_state(session_id, "completed")
    assert sha256_file(again.upload_dir / status["storedAs"]) == sha256_file(source)


def test_writer_count_and_health(make_server):
    server = make_server(env={"UPLOAD_SERVER_WRITERS": "3"})
    ready = requests.get(server.url("/readyz"), timeout=10).json()
    assert ready["ready"] is True
    assert ready["writers"] == ready["writersAlive"] == 3
    assert len(server.writer_pids()) == 3
    assert requests.get(server.url("/healthz"), timeout=10).json() == {"status": "ok"}


def test_port_env_is_honoured_and_flags_beat_env(tmp_path):
    port = free_port()
    env = {**os.environ, "PORT": str(port), "UPLOAD_SERVER_WRITERS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "upload_server.cli", "--upload-dir", str(tmp_path / "u")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), timeout=30)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--chunk-size", "lots"], "--chunk-size"),
        (["--port", "70000"], "--port"),
        (["--fsync", "sometimes"], "fsync"),
        (["--start-method", "teleport"], "start method"),
    ],
)
def test_invalid_settings_fail_at_start_up(tmp_path, args, needle):
    result = subprocess.run(
        [sys.executable, "-m", "upload_server.cli", "--upload-dir", str(tmp_path), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_second_server_on_the_same_directory_is_refused(make_server, tmp_path):
    server = make_server()
    other = Server(server.upload_dir)
    with pytest.raises(RuntimeError, match="another upload_server is using"):
        other.start(timeout=40)


def test_waitress_serve_call_factory(tmp_path, files):
    port = free_port()
    env = {
        **os.environ,
        "UPLOAD_SERVER_UPLOAD_DIR": str(tmp_path / "u"),
        "UPLOAD_SERVER_WRITERS": "1",
    }
    waitress_serve = os.path.join(os.path.dirname(sys.executable), "waitress-serve")
    proc = subprocess.Popen(
        [waitress_serve, "--listen", f"127.0.0.1:{port}", "--call", "upload_server:create_app"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), timeout=30)
        source = files(MiB + 3)
        with open(source, "rb") as handle:
            response = requests.post(
                f"http://127.0.0.1:{port}/upload", files={"file": ("w.bin", handle)}, timeout=30
            )
        assert response.status_code == 201
        session_id = response.json()["sessionID"]
        url = f"http://127.0.0.1:{port}/upload/status"
        wait_for(
            lambda: requests.get(url, params={"sessionID": session_id}, timeout=5).json()[
                "completed"
            ]
        )
        assert sha256_file(tmp_path / "u" / "w.bin") == sha256_file(source)
    finally:
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        wait_for(lambda: _gone([p.pid for p in family]), timeout=15)


def test_ipv6_loopback(make_server, files):
    if not _has_ipv6():
        pytest.skip("no IPv6 loopback on this machine")
    server = make_server(host="::1")
    response = server.post_file(files(1000))
    assert response.status_code == 201
    server.wait_state(response.json()["sessionID"], "completed")


def _has_ipv6() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_ctrl_c_works_when_started_with_sigint_ignored(tmp_path):
    """`upload-server &` in a script starts it with SIGINT ignored; `kill -INT` must still stop it."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "upload_server.cli",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--upload-dir",
            str(tmp_path / "uploads"),
        ],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), timeout=30)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False
