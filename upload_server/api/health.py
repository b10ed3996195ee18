"""Health checks for load balancers and PaaS routers.

GET /healthz answers 200 while the process serves requests. GET /readyz answers 200 only when every
writer is alive, the Manager answers and the upload directory's disk has room; otherwise 503, with
the reason, so a router stops sending uploads to a node that cannot store them. A writer that died
makes the node unready for RECOVERY_GRACE seconds even once it is replaced: its sessions are being
reclaimed, and a crash is worth a router's notice.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import falcon

from .. import metrics
from ..config import Config
from ..layout import Layout
from ..sessions.directory import SessionDirectory

RECOVERY_GRACE = 3.0  # seconds
MANAGER_TIMEOUT = 2.0  # seconds


def _within(timeout: float, call: Callable[[], Any]) -> Any:
    """`call()`, or TimeoutError if it has not returned in `timeout` (a stopped Manager never
    answers; a health check must)."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, call()))
        except Exception as exc:
            box.append((False, exc))

    worker = threading.Thread(target=run, name="readyz-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    if not box:
        raise TimeoutError(f"no answer in {timeout:.0f}s")
    ok, value = box[0]
    if not ok:
        raise value
    return value


class WriterVitals(Protocol):
    """What the checks read of the writer pool (`workers.pool.WriterPool`)."""

    @property
    def count(self) -> int: ...
    @property
    def last_death(self) -> float | None: ...
    @property
    def healing(self) -> bool: ...
    @property
    def restarts(self) -> int: ...
    @property
    def stalls(self) -> int: ...
    def ping(self, timeout: float = ...) -> int: ...
    def alive(self) -> int: ...
    def pids(self) -> list[int]: ...
    def queue_depths(self) -> list[int]: ...


class SessionCounts(Protocol):
    """What `/readyz` reads of the sessions (`service.SessionService`)."""

    @property
    def live(self) -> Any: ...  # `len()` of it asks the Manager


class HealthSource(Protocol):
    """What `/readyz` and `/metrics` read: the `Runtime` (any of its parts may be None while it
    starts or stops), or whatever a test serves instead."""

    @property
    def pool(self) -> WriterVitals | None: ...
    @property
    def service(self) -> SessionCounts | None: ...
    @property
    def directory(self) -> SessionDirectory | None: ...  # `problems()`, e.g. Redis unreachable
    @property
    def manager(self) -> Any: ...  # the SyncManager, for its process id
    @property
    def manager_restarts(self) -> int: ...
    @property
    def started(self) -> float: ...  # time.time() at start
    @property
    def config(self) -> Config: ...  # the chunk size and free-space reserve
    @property
    def layout(self) -> Layout: ...  # the upload disk, whose free space counts


class HealthResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class ReadyResource:
    def __init__(self, source: HealthSource) -> None:
        self.source = source

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        runtime = self.source
        pool = runtime.pool
        problems = []
        alive = pool.ping() if pool else 0
        count = pool.count if pool else 0
        if alive < count:
            problems.append(f"{count - alive} of {count} writers do not answer")
        if pool and pool.last_death is not None:
            since = time.monotonic() - pool.last_death
            if since < RECOVERY_GRACE:
                problems.append(f"a writer died {since:.1f}s ago; its sessions are being reclaimed")
        try:
            service = runtime.service
            sessions = _within(MANAGER_TIMEOUT, lambda: len(service.live)) if service else 0
        except Exception as exc:  # the Manager is gone or wedged
            sessions = None
            problems.append(f"the session Manager is unreachable: {exc}")
        if pool and pool.healing:
            problems.append("the session Manager is being restarted")
        if runtime.directory is not None:
            problems += runtime.directory.problems()
        free = shutil.disk_usage(runtime.layout.root).free
        if free < runtime.config.chunk_size + runtime.config.min_free_space:
            problems.append("the upload disk has no room above the free-space reserve")
        resp.status = falcon.HTTP_200 if not problems else falcon.HTTP_503
        resp.media = {
            "ready": not problems,
            "problems": problems,
            "writers": count,
            "writersAlive": alive,
            "writerPids": pool.pids() if pool else [],
            "writerRestarts": pool.restarts if pool else 0,
            "writerStalls": pool.stalls if pool else 0,
            "managerPid": runtime.manager._process.pid if runtime.manager else None,
            "managerRestarts": runtime.manager_restarts,
            "sessions": sessions,
            "diskFreeBytes": free,
            "uptimeSeconds": round(time.time() - runtime.started, 1),
        }


class MetricsResource:
    """GET /metrics in Prometheus text format, every process's figures together. A scrape costs
    O(series): counters and the sessions gauge are kept as things change (`in_progress`); only
    the writers' vital signs, a few numbers, are read here."""

    def __init__(self, source: HealthSource) -> None:
        self.source = source

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        figures = metrics.get()
        pool = self.source.pool
        if pool is not None:
            figures.writers_alive.set(pool.alive())
            for index, depth in enumerate(pool.queue_depths()):
                figures.writer_queue_depth.labels(str(index)).set(depth)
        body, content_type = metrics.render()
        resp.data = body
        resp.content_type = content_type
