"""A whole cluster on one machine: Redis, SeaweedFS, upload_server nodes and a round-robin proxy.

Used by `python -m benchmarks.localcluster` (to try cluster mode) and by `benchmarks/cluster.py`.
Every process listens on loopback and keeps its files under one directory; `stop` ends them all.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import services
from .proxy import RoundRobinProxy

BUCKET = "uploads"
PREFIX = "files"


class LocalCluster:
    def __init__(
        self,
        directory: Path,
        nodes: int = 3,
        node_args: Sequence[str] = (),
        proxy_port: int = 0,
        host: str = services.LOOPBACK,
    ) -> None:
        self.directory = directory
        self.count = nodes
        self.node_args = list(node_args)
        self.proxy_port = proxy_port
        self.host = host
        self.access_key = "upload-server-" + secrets.token_hex(4)
        self.secret_key = secrets.token_urlsafe(24)
        self.redis: services.Service | None = None
        self.s3: services.Service | None = None
        self.nodes: list[tuple[subprocess.Popen, str]] = []
        self.proxy: RoundRobinProxy | None = None

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> LocalCluster:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.redis = services.start_redis(self.directory / "redis")
        self.s3 = services.start_seaweedfs(
            self.directory / "seaweedfs", BUCKET, self.access_key, self.secret_key
        )
        for index in range(self.count):
            self.nodes.append(self._start_node(index))
        for process, url in self.nodes:
            _wait_healthy(process, url)
        backends = [(self.host, int(url.rsplit(":", 1)[1])) for _, url in self.nodes]
        self.proxy = RoundRobinProxy((self.host, self.proxy_port), backends).start()
        return self

    def node_environment(self) -> dict[str, str]:
        """The settings every node shares (as environment variables)."""
        assert self.redis is not None and self.s3 is not None
        return {
            "UPLOAD_SERVER_SESSION_STORE": self.redis.url,
            "UPLOAD_SERVER_STORAGE": f"s3://{BUCKET}/{PREFIX}",
            "UPLOAD_SERVER_S3_ENDPOINT": self.s3.url,
            "UPLOAD_SERVER_S3_ACCESS_KEY": self.access_key,
            "UPLOAD_SERVER_S3_SECRET_KEY": self.secret_key,
        }

    @property
    def node_urls(self) -> list[str]:
        return [url for _, url in self.nodes]

    def _start_node(self, index: int) -> tuple[subprocess.Popen, str]:
        port = services.free_port(self.host)
        name = f"node-{index + 1}"
        command = [
            sys.executable,
            "-m",
            "upload_server.cli",
            "--host",
            self.host,
            "--port",
            str(port),
            "--upload-dir",
            str(self.directory / name),
            "--node-id",
            name,
            *self.node_args,
        ]
        env = {**os.environ, **self.node_environment()}
        with open(self.directory / f"{name}.log", "ab") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        return process, f"http://{self.host}:{port}"

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.shutdown()
            self.proxy.server_close()
            self.proxy = None
        for process, _ in self.nodes:
            if process.poll() is None:
                process.terminate()
        for process, _ in self.nodes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.nodes = []
        for service in (self.s3, self.redis):
            if service is not None:
                service.stop()
        self.s3 = self.redis = None


def _wait_healthy(process: subprocess.Popen, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the node at {url} exited with {process.returncode}; see its log")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/healthz", timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the node at {url} did not start in {timeout}s")
