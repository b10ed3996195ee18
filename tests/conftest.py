"""Test harness: real servers in subprocesses on free loopback ports, real files on disk.

`UPLOAD_SERVER_START_METHOD` in the environment (CI runs the suite with `spawn` and with the
platform default) reaches every server started here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy; return its value or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        time.sleep(interval)


def settled_offset(server: Server, session_id: str, quiet: float = 1.5) -> int:
    """The upload's offset once it has stopped moving for `quiet` seconds (a PATCH that reached
    the server whole before the client stopped is still stored)."""
    last, since = -1, time.monotonic()
    deadline = since + 30
    while time.monotonic() < deadline:
        offset = server.status(session_id)["bytesWritten"]
        if offset != last:
            last, since = offset, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return offset
        time.sleep(0.1)
    raise AssertionError(f"the offset of {session_id} kept moving for 30 s")


def stored(server: Server, url: str) -> Path:
    """The stored file of a tus upload (by its URL) once it has completed."""
    status = server.wait_state(url.rsplit("/", 1)[1], "completed", "failed")
    assert status["state"] == "completed", status
    return server.upload_dir / status["storedAs"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def make_file(path: Path, size: int, seed: int = 0) -> Path:
    """A file of `size` pseudo-random bytes, the same for the same seed."""
    rng = random.Random(seed)
    with open(path, "wb") as handle:
        remaining = size
        while remaining:
            n = min(MiB, remaining)
            handle.write(rng.randbytes(n))
            remaining -= n
    return path


class Server:
    """One `upload-server` process; `args` are CLI flags, `env` extra environment."""

    def __init__(
        self,
        upload_dir: Path,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.upload_dir = upload_dir
        self.host = host
        self.port = port or free_port(host)
        self.args = args or []
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("UPLOAD_SERVER_WRITERS", "2")
        self.env.setdefault("UPLOAD_SERVER_LOG_LEVEL", "WARNING")
        self.proc: subprocess.Popen | None = None
        self.log_path = (log_dir or upload_dir.parent) / f"server-{self.port}.log"

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def start(self, timeout: float = 30.0) -> Server:
        cmd = [
            sys.executable,
            "-m",
            "upload_server.cli",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--upload-dir",
            str(self.upload_dir),
            *self.args,
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url("/healthz"), timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"server did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def family(self) -> list[psutil.Process]:
        """The server process and every process below it (Manager, writers)."""
        assert self.proc is not None
        try:
            parent = psutil.Process(self.proc.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def writer_pids(self) -> list[int]:
        return requests.get(self.url("/readyz"), timeout=10).json()["writerPids"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the server process only, as a crash would. Its children die with it on Linux
        (PR_SET_PDEATHSIG); in portable mode (`UPLOAD_SERVER_PORTABLE=1`, no such signal, as on
        Windows) those still alive after a few seconds are killed here, so tests leave none."""
        assert self.proc is not None
        family = self.family()
        self.proc.kill()
        self.proc.wait()
        self._log.close()
        timeout = 3 if os.environ.get("UPLOAD_SERVER_PORTABLE") == "1" else 10
        _, alive = psutil.wait_procs(family[1:], timeout=timeout)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=10)

    # -- seed API helpers -------------------------------------------------------------------

    def post_file(
        self, path: Path, filename: str | None = None, **kwargs: Any
    ) -> requests.Response:
        with open(path, "rb") as handle:
            files = {"file": (filename or path.name, handle, "application/octet-stream")}
            return requests.post(self.url("/upload"), files=files, timeout=120, **kwargs)

    def resume_file(self, session_id: str, path: Path) -> requests.Response:
        """POST /upload/resume with the file sent again."""
        with open(path, "rb") as handle:
            return requests.post(
                self.url("/upload/resume"),
                params={"sessionID": session_id},
                files={"file": (path.name, handle)},
                timeout=60,
            )

    def status(self, session_id: str) -> dict[str, Any]:
        response = requests.get(
            self.url("/upload/status"), params={"sessionID": session_id}, timeout=30
        )
        assert response.status_code == 200, response.text
        return response.json()

    def wait_state(self, session_id: str, *states: str, timeout: float = 60.0) -> dict[str, Any]:
        return wait_for(
            lambda: (s := self.status(session_id))["state"] in states and s, timeout=timeout
        )


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers on demand; every one is stopped at the end of the test."""
    started: list[Server] = []

    def start(
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        upload_dir: Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> Server:
        server = Server(upload_dir or tmp_path / "uploads", args, env, host, port, tmp_path)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs (needs the right to mount: root or CAP_SYS_ADMIN; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server shared by a test module (tests that need their own use make_server)."""
    directory = tmp_path_factory.mktemp("shared")
    instance = Server(directory / "uploads").start()
    yield instance
    instance.stop()


@pytest.fixture
def files(tmp_path: Path) -> Callable[[int, int], Path]:
    counter = iter(range(10**6))

    def make(size: int, seed: int = 0) -> Path:
        return make_file(tmp_path / f"file-{next(counter)}-{size}.bin", size, seed)

    return make


@pytest.fixture(scope="session")
def tus_js() -> Callable[..., dict]:
    """Run tests/js/upload.mjs (an unmodified tus-js-client on node) with these options; its
    outcome, `{"url", "bytesUploaded", "aborted", "requests"}`."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed for the tus-js-client tests (.ci/run installs them)")
    folder = ROOT / "tests" / "js"
    if not (folder / "node_modules" / "tus-js-client").exists():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=folder,
            check=True,
            capture_output=True,
            timeout=300,
        )

    def run(**options) -> dict:
        result = subprocess.run(
            [node, "upload.mjs", json.dumps(options)],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        assert lines, f"tus-js-client printed nothing:\n{result.stdout}\n{result.stderr}"
        outcome = json.loads(lines[-1])
        assert "error" not in outcome, outcome
        return outcome

    return run
