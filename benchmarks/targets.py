"""What the benchmark measures: two upload_server set-ups, @tus/server, and two ceilings.

Every server runs in its own process on a free 127.0.0.1 port with its own directory under the run's
temporary directory, and is stopped by its pid (then any process left in its tree, by pid too).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psutil
from client import Connection, Payload, wait_completed

# The settings recommended for bulk uploads: one list, so it is easy to try others.
BULK_FLAGS = ["--threads", "64", "--writers", "4"]
# Like for like with @tus/server, whose FileStore never syncs: the same server without fsync.
NOSYNC_FLAGS = ["--fsync", "never"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TUS_NODE_DIR = HERE / "tus-node"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
NPM_TIMEOUT = 600.0


class Skipped(Exception):
    """The target cannot run on this machine (the message says why)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def npm_ci(directory: Path, package: Path, what: str) -> None:
    """`npm ci` in `directory` (a package.json and package-lock.json of the benchmarks) unless
    `node_modules/<package>` is there already; Skipped, saying why, when node or npm is missing or
    the install fails."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise Skipped(f"node and npm are not installed: {what} is left out of this run")
    if (directory / "node_modules" / package).is_dir():
        return
    where = directory.relative_to(REPO)
    print(f"installing {what}: npm ci in {where}", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise Skipped(f"npm ci took over {NPM_TIMEOUT:.0f}s: {what} left out") from None
    if done.returncode != 0:
        raise Skipped(f"npm ci failed, {what} left out:\n{done.stderr[-2000:]}")


@dataclass
class Target(ABC):
    """One column of the table."""

    key: str  # the name --targets takes
    label: str  # the column heading
    apis: ClassVar[frozenset[str]] = frozenset()  # "seed", "tus", "disk"
    verifiable: ClassVar[bool] = True
    host: ClassVar[str] = "127.0.0.1"
    port: int = field(init=False, default=0)
    workdir: Path = field(init=False, default=Path())
    proc: subprocess.Popen[bytes] | None = field(init=False, default=None)
    log_path: Path | None = field(init=False, default=None)

    @abstractmethod
    def start(self, workdir: Path) -> None:
        """Start the target in `workdir` (a fresh, empty directory of its own)."""

    def fresh(self) -> Target:
        """A new, unstarted target set up like this one (the memory workload starts its own)."""
        return type(self)(self.key, self.label)

    def connect(self) -> Connection:
        return Connection(self.host, self.port)

    def stored_file(self, conn: Connection, api: str, handle: str) -> tuple[Path, str | None]:
        """Where the target stored an upload (`handle`: seed session id or tus location), and the
        SHA-256 the target itself reports for it, if any."""
        raise NotImplementedError

    def discard(self, path: Path) -> None:
        """Delete a verified upload, so a long run does not fill the disk."""
        path.unlink(missing_ok=True)

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "apis": sorted(self.apis)}

    def processes(self) -> list[psutil.Process]:
        """The target's process and all its descendants (front end, Manager, writers; node)."""
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _spawn(self, cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "server.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    def _wait_ready(self, method: str, path: str, ok: tuple[int, ...]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.label} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            conn = self.connect()
            try:
                if conn.request(method, path, {"Tus-Resumable": "1.0.0"}).status in ok:
                    return
            except (OSError, http.client.HTTPException):
                pass  # not listening yet
            finally:
                conn.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label} not ready after {START_TIMEOUT:.0f}s")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM the target's process, wait, then kill whatever of its tree is left (by pid)."""
        if self.proc is None:
            return
        tree = self.processes()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(
                f"warning: {self.label} did not stop in {STOP_TIMEOUT:.0f}s; killing it",
                file=sys.stderr,
            )
        _, alive = psutil.wait_procs(tree, timeout=5)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(alive, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.proc = None


@dataclass
class UploadServer(Target):
    """`python -m upload_server.cli` from this checkout, with `flags` on top of its defaults."""

    flags: list[str] = field(default_factory=list)
    apis: ClassVar[frozenset[str]] = frozenset({"seed", "tus"})

    def fresh(self) -> Target:
        return UploadServer(self.key, self.label, list(self.flags))

    @property
    def upload_dir(self) -> Path:
        return self.workdir / "uploads"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "upload_server.cli",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--upload-dir",
            str(self.upload_dir),
            *self.flags,
        ]

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        # Defaults must be the defaults: no UPLOAD_SERVER_* or PORT from the caller's environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("UPLOAD_SERVER_")}
        env.pop("PORT", None)
        self._spawn(self.command(), cwd=REPO, env=env)
        self._wait_ready("GET", "/healthz", (200,))

    def stored_file(self, conn: Connection, api: str, handle: str) -> tuple[Path, str | None]:
        session_id = handle.rstrip("/").rsplit("/", 1)[-1]
        status = wait_completed(conn, session_id, timeout=120)
        return self.upload_dir / status["storedAs"], status.get("sha256")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "flags": self.flags}


@dataclass
class TusNode(Target):
    """@tus/server 2.x with @tus/file-store (benchmarks/tus-node/server.mjs), installed by npm."""

    apis: ClassVar[frozenset[str]] = frozenset({"tus"})

    @property
    def store_dir(self) -> Path:
        return self.workdir / "files"

    @staticmethod
    def install() -> None:
        """`npm ci` into benchmarks/tus-node when node_modules is missing; Skipped if impossible."""
        npm_ci(TUS_NODE_DIR, Path("@tus", "server"), "@tus/server")

    def start(self, workdir: Path) -> None:
        self.install()
        self.workdir = workdir
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._spawn(["node", "server.mjs", str(self.port), str(self.store_dir)], cwd=TUS_NODE_DIR)
        self._wait_ready("OPTIONS", "/files/", (200, 204))

    def stored_file(self, conn: Connection, api: str, handle: str) -> tuple[Path, str | None]:
        return self.store_dir / handle.rstrip("/").rsplit("/", 1)[-1], None

    def discard(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".json").unlink(missing_ok=True)  # FileStore's metadata

    def describe(self) -> dict[str, Any]:
        version = "?"
        package = TUS_NODE_DIR / "node_modules" / "@tus" / "server" / "package.json"
        if package.exists():
            version = json.loads(package.read_text())["version"]
        return {**super().describe(), "version": version}


@dataclass
class Sink(Target):
    """The loopback ceiling: the client into benchmarks/sink.py, which discards every body."""

    apis: ClassVar[frozenset[str]] = frozenset({"seed", "tus"})
    verifiable: ClassVar[bool] = False

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "sink.py")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(START_TIMEOUT):
                raise RuntimeError("the sink did not start")
        self.port = int(self.proc.stdout.readline())
        self._wait_ready("GET", "/healthz", (200,))


@dataclass
class Disk(Target):
    """The disk ceiling: sequential 8 MiB writes of the same bytes to a fresh file, then fdatasync."""

    apis: ClassVar[frozenset[str]] = frozenset({"disk"})
    verifiable: ClassVar[bool] = False
    block: ClassVar[int] = 8 * 1024 * 1024

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)

    def write(self, payload: Payload) -> float:
        """Seconds to write `payload` to a new file in the target's directory and fdatasync it."""
        path = self.workdir / "ceiling.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            start = time.perf_counter()
            for view in payload.views(0, payload.size, self.block):
                while view:
                    view = view[os.write(fd, view) :]
            os.fdatasync(fd)
            return time.perf_counter() - start
        finally:
            os.close(fd)
            path.unlink()


def all_targets() -> list[Target]:
    """Every target, in column order."""
    return [
        UploadServer("defaults", "upload_server defaults"),
        UploadServer("bulk", "upload_server bulk", list(BULK_FLAGS)),
        UploadServer("nosync", "upload_server --fsync never", list(NOSYNC_FLAGS)),
        TusNode("tus-node", "@tus/server"),
        Sink("loopback", "loopback"),
        Disk("disk", "disk"),
    ]
