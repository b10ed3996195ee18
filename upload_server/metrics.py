"""Prometheus metrics, counted in every process and served together at GET /metrics.

prometheus-client's multiprocess mode keeps each process's values in files of one directory, so
what the writer processes count (bytes written) adds up with what the front end counts. The
directory must be chosen before prometheus_client is imported anywhere, so this module imports it
lazily: `setup()` runs first in the front end, and writers inherit the environment.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def setup(directory: Path) -> None:
    """Use `directory` for multiprocess values (unless the operator chose one), emptied of the
    files of processes that no longer run."""
    if ENV not in os.environ:
        os.environ[ENV] = str(directory)
    path = Path(os.environ[ENV])
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.uploads_started = Counter(
            "upload_server_uploads_started", "Upload sessions created", ["protocol"]
        )
        self.uploads_completed = Counter(
            "upload_server_uploads_completed", "Uploads completed and published", ["protocol"]
        )
        self.uploads_failed = Counter(
            "upload_server_uploads_failed", "Uploads that failed", ["protocol", "reason"]
        )
        self.uploads_ended = Counter(
            "upload_server_uploads_ended", "Uploads terminated or expired", ["how"]
        )
        self.bytes_received = Counter(
            "upload_server_bytes_received", "Upload bytes accepted into the spool", ["protocol"]
        )
        self.bytes_spooled = Counter(
            "upload_server_bytes_spooled",
            "Bytes put in the spool, by how: linked (no copy) or copied by the kernel",
            ["how"],
        )
        self.cut_bytes = Counter(
            "upload_server_cut_bytes",
            "Bytes of request bodies cut off mid-way: kept (they count, as a shorter request's "
            "would) or discarded (Upload-Checksum, or the upload had moved on)",
            ["outcome"],
        )
        self.bytes_written = Counter(
            "upload_server_bytes_written", "Upload bytes written by the writers"
        )
        self.active_sessions = Gauge(
            "upload_server_active_sessions",
            "Sessions in progress (unfinished and not failed)",
            multiprocess_mode="livesum",
        )
        self.writer_queue_depth = Gauge(
            "upload_server_writer_queue_depth",
            "Requests waiting for each writer",
            ["writer"],
            multiprocess_mode="livesum",
        )
        self.writers_alive = Gauge(
            "upload_server_writers_alive", "Writer processes alive", multiprocess_mode="livesum"
        )
        self.writer_restarts = Counter(
            "upload_server_writer_restarts",
            "Writer processes replaced, by why: died (exited or was killed) or stalled (held "
            "work without heartbeat or progress past --writer-stall-timeout, and was killed)",
            ["reason"],
        )
        self.writers_unresponsive = Counter(
            "upload_server_writers_unresponsive",
            "Times a writer's heartbeat went silent and its waiting requests were answered 503",
        )
        self.manager_restarts = Counter(
            "upload_server_manager_restarts",
            "Times the session Manager died and was replaced (every writer with it)",
        )
        self.request_duration = Histogram(
            "upload_server_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.s3_requests = Counter(
            "upload_server_s3_requests", "S3 API calls made (storage s3://)", ["operation"]
        )
        self.hook_deliveries = Counter(
            "upload_server_hook_deliveries", "Hook deliveries by outcome", ["event", "outcome"]
        )
        self._zeros()

    def _zeros(self) -> None:
        """Create the series whose labels are known, so a scrape shows 0 rather than nothing."""
        from .config_values import HOOK_EVENTS

        for protocol in ("seed", "tus", "ietf"):
            self.uploads_started.labels(protocol)
            self.uploads_completed.labels(protocol)
            self.bytes_received.labels(protocol)
        for how in ("terminated", "expired"):
            self.uploads_ended.labels(how)
        for how in ("linked", "copied"):
            self.bytes_spooled.labels(how)
        for outcome in ("kept", "discarded"):
            self.cut_bytes.labels(outcome)
        for reason in ("died", "stalled"):
            self.writer_restarts.labels(reason)
        for event in HOOK_EVENTS:
            for outcome in ("delivered", "failed", "retried", "dropped", "rejected"):
                self.hook_deliveries.labels(event, outcome)


@functools.cache
def get() -> Metrics:
    return Metrics()


def render() -> tuple[bytes, str]:
    """Every process's metrics, aggregated: (body, content type). Without `setup()` (an app built
    by `build_app` alone, as the in-process tests build it) this process's own."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    if ENV not in os.environ:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_dead(pid: int) -> None:
    """Drop a dead process's live gauges (its counters keep counting in the totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
