"""`python -m benchmarks.localcluster`: Redis, SeaweedFS, three nodes and a round-robin proxy.

    python -m benchmarks.localcluster                    # proxy on http://127.0.0.1:8080
    python -m benchmarks.localcluster --nodes 2 --port 9000 -- --max-bytes-per-second 1MiB

Run it from the repository root (the nodes are `python -m upload_server.cli` from there).

Flags after `--` go to every node. Ctrl-C stops everything; the working directory (a temporary one
unless `--dir` is given) keeps each process's log.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cluster import BUCKET, PREFIX, LocalCluster


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    node_args = args[args.index("--") + 1 :] if "--" in args else []
    args = args[: args.index("--")] if "--" in args else args
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.localcluster",
        description="Run Redis, SeaweedFS, upload_server nodes and a round-robin proxy locally.",
    )
    parser.add_argument("--nodes", type=int, default=3, help="upload_server nodes (default 3)")
    parser.add_argument("--port", type=int, default=8080, help="the proxy's port (default 8080)")
    parser.add_argument("--dir", type=Path, help="working directory (default: a temporary one)")
    options = parser.parse_args(args)
    if options.nodes < 1:
        parser.error("--nodes must be at least 1")
    directory = options.dir or Path(tempfile.mkdtemp(prefix="upload-server-cluster-"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with LocalCluster(directory, options.nodes, node_args, options.port) as cluster:
            _describe(cluster, directory)
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait()
            print("stopping…", flush=True)
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        print(f"localcluster: {exc}", file=sys.stderr)
        return 1
    return 0


def _describe(cluster: LocalCluster, directory: Path) -> None:
    assert cluster.proxy is not None and cluster.redis is not None and cluster.s3 is not None
    lines: list[Any] = [
        f"upload_server cluster of {len(cluster.nodes)} nodes, files in s3://{BUCKET}/{PREFIX}",
        f"  proxy (round robin):  {cluster.proxy.url}   tus: {cluster.proxy.url}/files/",
        *(f"  node {i + 1}:              {url}" for i, url in enumerate(cluster.node_urls)),
        f"  Redis:                {cluster.redis.url}",
        f"  S3 (SeaweedFS):       {cluster.s3.url}   access key {cluster.access_key}",
        f"                        secret key {cluster.secret_key}",
        f"  logs:                 {directory}",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
