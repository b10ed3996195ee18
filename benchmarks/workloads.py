"""The workloads: what is sent to each target, what is timed, and how each upload is verified.

A workload runs against one target and returns its figures for that repetition, keyed by metric.
Timing covers the requests only; every upload is checked afterwards (`Context.verify`): the file
the target stored must have the SHA-256 of the bytes sent, and so must the digest it reports.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import slow
import tusjs
from client import (
    Connection,
    GiB,
    KiB,
    MiB,
    Pattern,
    Payload,
    seed_post,
    seed_status,
    tus_create,
    tus_head,
    tus_upload,
    wait_completed,
)
from cutproxy import CutProxy
from targets import Disk, Target

TUS_ENDPOINT = "/files/"
DEFAULT_PATCH = 8 * MiB


@dataclass(frozen=True)
class Sizes:
    reps: int
    seed: int  # one file through the seed API
    single: int  # one file over tus
    patches: tuple[int, ...]  # PATCH sizes for the single-file tus workload
    concurrent: tuple[int, int]  # (uploads at once, bytes each)
    small: tuple[int, int, int]  # (uploads, bytes each, at once)
    memory: tuple[int, ...]  # file sizes for the memory workload, smallest first
    cut: tuple[int, int]  # (file size, bytes each connection carries upstream before it is cut)
    # (fast file size, slow connection counts, connections holding part of a body, bytes each holds)
    slow: tuple[int, tuple[int, ...], int, int]


FULL = Sizes(
    reps=3,
    seed=GiB,
    single=GiB,
    patches=(8 * MiB, 32 * MiB),
    concurrent=(16, 64 * MiB),
    small=(500, MiB, 32),
    memory=(256 * MiB, GiB, 2 * GiB),
    cut=(64 * MiB, 24 * MiB),
    slow=(GiB, (1000, 2000), 2000, 400 * KiB),
)
QUICK = Sizes(
    reps=1,
    seed=8 * MiB,
    single=16 * MiB,
    patches=(8 * MiB, 32 * MiB),
    concurrent=(4, 4 * MiB),
    small=(20, 64 * KiB, 32),
    memory=(64 * MiB,),
    cut=(8 * MiB, 3 * MiB),
    slow=(32 * MiB, (100,), 100, 400 * KiB),
)


def size_text(size: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


@dataclass(frozen=True)
class Metric:
    """One row of the table."""

    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    vs_ceiling: bool = False  # compared with min(loopback, disk)
    shown: bool = True  # False: in the JSON, not in the table (what the "bounded by" verdict uses)


@dataclass
class Check:
    target: Target
    workload: str
    api: str
    handle: str  # seed session id or tus location
    payload: Payload


@dataclass
class Context:
    """What the workloads share during one run."""

    sizes: Sizes
    pattern: Pattern
    workdir: Path
    pending: list[Check] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    verified: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check_later(
        self, target: Target, workload: str, api: str, handle: str, payload: Payload
    ) -> None:
        if target.verifiable:
            with self._lock:
                self.pending.append(Check(target, workload, api, handle, payload))

    def fail(self, target: Target, workload: str, problem: str) -> None:
        with self._lock:
            self.failures.append({"target": target.label, "workload": workload, "problem": problem})

    def verify(self) -> None:
        """Check every upload made since the last call; delete the stored files."""
        pending, self.pending = self.pending, []
        connections: dict[int, Connection] = {}
        for check in pending:
            conn = connections.setdefault(id(check.target), check.target.connect())
            where = f"{check.api} upload {check.handle}"
            try:
                path, reported = check.target.stored_file(conn, check.api, check.handle)
                expected = check.payload.sha256
                if reported is not None and reported != expected:
                    self.fail(check.target, check.workload, f"{where}: reported sha256 {reported}")
                elif not path.is_file():
                    self.fail(check.target, check.workload, f"{where}: no file at {path}")
                elif (actual := sha256_file(path)) != expected:
                    self.fail(check.target, check.workload, f"{where}: {path} has sha256 {actual}")
                else:
                    self.verified += 1
                check.target.discard(path)
            except Exception as exc:
                self.fail(check.target, check.workload, f"{where}: cannot verify: {exc!r}")
        for conn in connections.values():
            conn.close()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method), in milliseconds for a list of seconds."""
    if len(values) == 1:
        return values[0] * 1000
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


def rate(size: int, seconds: float) -> float:
    return size / MiB / seconds


def completion_timeout(size: int) -> float:
    return 60 + size / (10 * MiB)


class Incomplete(Exception):
    """A workload's upload did not complete; `figures` holds what was measured all the same.
    `counted`: the failure is already in `Context.failures` (a stored file that was wrong)."""

    def __init__(self, message: str, figures: dict[str, float], counted: bool = False) -> None:
        super().__init__(message)
        self.figures = figures
        self.counted = counted


# -- the workloads ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str  # for --only
    title: str
    metrics: Callable[[Sizes], list[Metric]]
    run: Callable[[Context, Target], dict[str, float]]
    applies: Callable[[Target], bool]
    # The bytes one run moves through a server, for per-process CPU per GiB (None: not measured).
    volume: Callable[[Sizes], int] | None = None


def _seed_metrics(s: Sizes) -> list[Metric]:
    return [Metric("seed", f"seed API, 1x{size_text(s.seed)}", "MiB/s", vs_ceiling=True)]


def _seed(ctx: Context, target: Target) -> dict[str, float]:
    payload = ctx.pattern.payload(ctx.sizes.seed)
    if isinstance(target, Disk):
        return {"seed": rate(payload.size, target.write(payload))}
    conn = target.connect()
    try:
        start = time.perf_counter()
        session_id = seed_post(conn, payload)
        wait_completed(conn, session_id, completion_timeout(payload.size))
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    ctx.check_later(target, "seed", "seed", session_id, payload)
    return {"seed": rate(payload.size, elapsed)}


def _tus_single(patch: int) -> Callable[[Context, Target], dict[str, float]]:
    key = f"tus-{patch // MiB}"

    def run(ctx: Context, target: Target) -> dict[str, float]:
        payload = ctx.pattern.payload(ctx.sizes.single)
        if isinstance(target, Disk):
            return {key: rate(payload.size, target.write(payload))}
        conn = target.connect()
        try:
            start = time.perf_counter()
            timings = tus_upload(conn, TUS_ENDPOINT, payload, patch)
            elapsed = time.perf_counter() - start
        finally:
            conn.close()
        ctx.check_later(target, f"tus {size_text(patch)}", "tus", timings.location, payload)
        return {key: rate(payload.size, elapsed)}

    return run


def _concurrent_metrics(s: Sizes) -> list[Metric]:
    count, size = s.concurrent
    during = f"during {count}x{size_text(size)}"
    return [
        Metric("concurrent", f"tus {count}x{size_text(size)} at once", "MiB/s", vs_ceiling=True),
        Metric("status-p50", f"GET /upload/status p50 {during}", "ms", False),
        Metric("status-p99", f"GET /upload/status p99 {during}", "ms", False),
        Metric("head-p50", f"tus HEAD p50 {during}", "ms", False),
        Metric("head-p99", f"tus HEAD p99 {during}", "ms", False),
    ]


class Poller(threading.Thread):
    """Times status and HEAD requests while uploads run, on connections of its own.

    HEAD goes to an upload the poller created and leaves idle: @tus/server's HEAD takes the upload's
    lock and cancels a PATCH in flight on it, and no client HEADs the upload it is sending. Status
    (a seed API request, which takes no lock) asks about the newest upload in flight.
    """

    def __init__(self, target: Target) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.newest: str | None = None
        self.head_seconds: list[float] = []
        self.status_seconds: list[float] = []
        self.error: Exception | None = None
        self._stop_event = threading.Event()
        self._conn = target.connect()
        self._idle = tus_create(self._conn, TUS_ENDPOINT, MiB, "bench-idle.bin")

    def run(self) -> None:
        try:
            while not self._stop_event.wait(0.01):
                start = time.perf_counter()
                tus_head(self._conn, self._idle)
                self.head_seconds.append(time.perf_counter() - start)
                newest = self.newest
                if newest is not None and "seed" in self.target.apis:
                    start = time.perf_counter()
                    seed_status(self._conn, newest.rstrip("/").rsplit("/", 1)[-1])
                    self.status_seconds.append(time.perf_counter() - start)
        except Exception as exc:
            self.error = exc
        finally:
            self._conn.close()

    def finish(self) -> dict[str, float]:
        self._stop_event.set()
        self.join(60)
        if self.error is not None:
            raise self.error
        figures = {}
        if self.head_seconds:
            figures |= {
                "head-p50": percentile(self.head_seconds, 50),
                "head-p99": percentile(self.head_seconds, 99),
            }
        if self.status_seconds:
            figures |= {
                "status-p50": percentile(self.status_seconds, 50),
                "status-p99": percentile(self.status_seconds, 99),
            }
        return figures


def _concurrent(ctx: Context, target: Target) -> dict[str, float]:
    count, size = ctx.sizes.concurrent
    if isinstance(target, Disk):
        return {"concurrent": rate(count * size, target.write(ctx.pattern.payload(count * size)))}
    payloads = [ctx.pattern.payload(size) for _ in range(count)]
    poller = Poller(target)

    def created(location: str) -> None:
        poller.newest = location

    def one(payload: Payload) -> str:
        conn = target.connect()
        try:
            return tus_upload(conn, TUS_ENDPOINT, payload, DEFAULT_PATCH, created).location
        finally:
            conn.close()

    poller.start()
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(count) as pool:
            locations = list(pool.map(one, payloads))
        elapsed = time.perf_counter() - start
    finally:
        latencies = poller.finish()
    for location, payload in zip(locations, payloads, strict=True):
        ctx.check_later(target, "tus concurrent", "tus", location, payload)
    return {"concurrent": rate(count * size, elapsed), **latencies}


def _small_metrics(s: Sizes) -> list[Metric]:
    count, size, parallel = s.small
    what = f"tus {count}x{size_text(size)}, {parallel} at once"
    return [
        Metric("small-rate", what, "uploads/s"),
        Metric("small-create-p50", "  creation p50", "ms", False),
        Metric("small-create-p99", "  creation p99", "ms", False),
        Metric("small-patch-p50", "  PATCH p50", "ms", False),
        Metric("small-patch-p99", "  PATCH p99", "ms", False),
    ]


def _small(ctx: Context, target: Target) -> dict[str, float]:
    count, size, parallel = ctx.sizes.small
    payloads = [ctx.pattern.payload(size) for _ in range(count)]
    local = threading.local()
    connections: list[Connection] = []

    def one(payload: Payload) -> tuple[str, float, list[float]]:
        if not hasattr(local, "conn"):
            local.conn = target.connect()
            connections.append(local.conn)
        timings = tus_upload(local.conn, TUS_ENDPOINT, payload, size)
        return timings.location, timings.create_seconds, timings.patch_seconds

    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(min(parallel, count)) as pool:
            results = list(pool.map(one, payloads))
        elapsed = time.perf_counter() - start
    finally:
        for conn in connections:
            conn.close()
    for (location, _, _), payload in zip(results, payloads, strict=True):
        ctx.check_later(target, "tus small", "tus", location, payload)
    creates = [r[1] for r in results]
    patches = [t for r in results for t in r[2]]
    return {
        "small-rate": count / elapsed,
        "small-create-p50": percentile(creates, 50),
        "small-create-p99": percentile(creates, 99),
        "small-patch-p50": percentile(patches, 50),
        "small-patch-p99": percentile(patches, 99),
    }


# -- through a connection that keeps being cut -------------------------------------------------

CUT_TIMEOUT = 120.0  # an upload not completed by then (the client still retrying) failed the row


def _cut_metrics(s: Sizes) -> list[Metric]:
    size, every = s.cut
    return [
        Metric(
            "cut-seconds",
            f"{size_text(size)} through a connection cut every {size_text(every)}, "
            "tus-js-client defaults: time",
            "s",
            False,
        ),
        Metric("cut-sent", "  bytes sent through the proxy", "MiB", False),
        Metric("cut-sent-ratio", "  bytes sent / file size", "x", False),
        Metric("cut-cuts", "  connections cut", "cuts", False),
        Metric("cut-completed", "  completed, byte-identical (1 yes, 0 no)", "1/0"),
    ]


def _cut(ctx: Context, target: Target) -> dict[str, float]:
    """tus-js-client at its defaults (the whole file in one PATCH) uploads one file through
    `CutProxy`, which cuts every connection once it has carried `every` bytes upstream; the client
    retries (HEAD, then PATCH from the offset the server reports) until the upload completes.
    Timed by node from upload.start() to onSuccess; the stored file is checked here, so that
    "completed" means byte-identical."""
    size, every = ctx.sizes.cut
    tusjs.install()
    payload = ctx.pattern.payload(size)
    path = ctx.workdir / payload.filename
    with open(path, "wb") as handle:
        for view in payload.views(0, size):
            handle.write(view)
    proxy = CutProxy(target.port, every)
    proxy.start()
    try:
        endpoint = f"http://{target.host}:{proxy.port}{TUS_ENDPOINT}"
        outcome = tusjs.upload(endpoint, path, CUT_TIMEOUT)
    finally:
        proxy.stop()
        path.unlink()
    stats = proxy.stats()
    figures = {
        "cut-sent": stats.bytes_up / MiB,
        "cut-sent-ratio": stats.bytes_up / size,
        "cut-cuts": float(stats.cuts),
    }
    if outcome.url is None:
        raise Incomplete(
            f"tus-js-client: {outcome.error} ({stats.cuts} cuts, {stats.bytes_up / MiB:.0f} MiB "
            f"sent in {outcome.seconds:.1f}s)",
            {**figures, "cut-completed": 0.0},
        )
    failures = len(ctx.failures)
    ctx.check_later(target, "cut", "tus", urlsplit(outcome.url).path, payload)
    ctx.verify()
    if len(ctx.failures) > failures:
        raise Incomplete(
            "the stored file is not byte-identical",
            {"cut-seconds": outcome.seconds, **figures, "cut-completed": 0.0},
            counted=True,
        )
    return {"cut-seconds": outcome.seconds, **figures, "cut-completed": 1.0}


# -- a fast upload among many slow connections -------------------------------------------------

SLOW_UPLOAD_TIMEOUT = 60.0  # the longest the fast client waits for any one answer


def _slow_metrics(s: Sizes) -> list[Metric]:
    size, counts, holders, held = s.slow
    rows = [Metric("slow-alone", f"tus 1x{size_text(size)}, 8 MiB PATCHes, alone", "MiB/s")]
    for count in counts:
        rows += [
            Metric(f"slow-{count}", f"  with {count:,} slow connections open", "MiB/s"),
            Metric(f"slow-{count}-ratio", f"  with {count:,} slow connections / alone", "x"),
        ]
    return [
        *rows,
        Metric("slow-closed", "  slow connections the server closed (replaced)", "conns", False),
        Metric("slow-rss-idle", "front end RSS, no slow connections", "MiB", False),
        Metric(
            "slow-rss",
            f"front end peak RSS, {holders:,} connections holding {size_text(held)} of a body",
            "MiB",
            False,
        ),
    ]


def _slow_upload(ctx: Context, target: Target, size: int) -> float:
    """MiB/s of one tus upload in 8 MiB PATCHes, from 127.0.0.1; verified afterwards."""
    payload = ctx.pattern.payload(size)
    conn = Connection(target.host, target.port, timeout=SLOW_UPLOAD_TIMEOUT)
    try:
        start = time.perf_counter()
        timings = tus_upload(conn, TUS_ENDPOINT, payload, DEFAULT_PATCH)
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    ctx.check_later(target, "slow", "tus", timings.location, payload)
    return rate(size, elapsed)


def _slow(ctx: Context, target: Target) -> dict[str, float]:
    """A fast tus upload alone, then with each count of slow connections open (half a header line,
    then a byte every 2 s, from 127.0.0.2..9; replaced at once if the server closes one); then the
    server's own process's peak RSS (not its children's) while `holders` connections each hold
    `held` bytes of a 1 MiB PATCH body to an upload of their own."""
    size, counts, holders, held = ctx.sizes.slow
    slow.check_platform(max(*counts, holders))
    assert target.proc is not None
    pid = target.proc.pid
    figures = {"slow-alone": _slow_upload(ctx, target, size)}
    closed = 0
    for count in counts:
        with slow.Tricklers(target.host, target.port, count) as tricklers:
            tricklers.wait_open()
            figures[f"slow-{count}"] = _slow_upload(ctx, target, size)
            closed += tricklers.replaced
        figures[f"slow-{count}-ratio"] = figures[f"slow-{count}"] / figures["slow-alone"]
        slow.wait_released(target.port)
    figures["slow-closed"] = float(closed)
    figures["slow-rss-idle"] = psutil.Process(pid).memory_info().rss / MiB
    locations = slow.create_uploads(target.host, target.port, TUS_ENDPOINT, holders, MiB)
    with (
        slow.PeakRss(pid) as peak,
        slow.HeldBodies(target.host, target.port, locations, MiB, held) as bodies,
    ):
        bodies.wait_read()
        time.sleep(1.0)  # what the server does once it has read them shows in the peak too
        answered = bodies.answered()
    figures["slow-rss"] = peak.peak / MiB
    slow.wait_released(target.port)
    slow.wait_quiet(target.processes)
    if answered:
        raise Incomplete(
            f"the server answered or closed {answered} of the {holders} partial bodies early",
            figures,
        )
    return figures


# -- memory and CPU -----------------------------------------------------------------------------


class Monitor:
    """Peak memory summed over a target's process tree (sampled every 50 ms) and its CPU seconds.

    RSS is what the issue asks for; it counts pages that forked processes share once per process.
    PSS splits each shared page between the processes that map it, so it adds up to what the tree
    really holds.
    """

    def __init__(self, target: Target, interval: float = 0.05) -> None:
        self.target = target
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop_event = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        rss = pss = 0
        for process in self.target.processes():
            try:
                with process.oneshot():
                    memory = process.memory_full_info()
                    times = process.cpu_times()
            except psutil.Error:
                continue
            rss += memory.rss
            pss += memory.pss
            self._cpu_first.setdefault(process.pid, times.user + times.system)
            self._cpu_last[process.pid] = times.user + times.system
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)

    def _loop(self) -> None:
        while not self._stop_event.wait(self.interval):
            self._sample()

    def __enter__(self) -> Monitor:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_event.set()
        self._thread.join()
        self._sample()

    @property
    def cpu_seconds(self) -> float:
        return sum(last - self._cpu_first[pid] for pid, last in self._cpu_last.items())


def _memory_metrics(api: str) -> Callable[[Sizes], list[Metric]]:
    def metrics(s: Sizes) -> list[Metric]:
        largest = size_text(s.memory[-1])
        return [
            *(
                Metric(
                    f"rss-{api}-{size // MiB}", f"peak RSS, {api} 1x{size_text(size)}", "MiB", False
                )
                for size in s.memory
            ),
            Metric(f"pss-{api}", f"peak PSS, {api} 1x{largest}", "MiB", False),
            Metric(f"cpu-{api}", f"CPU per GiB, {api} 1x{largest}", "s/GiB", False),
        ]

    return metrics


def _memory(api: str) -> Callable[[Context, Target], dict[str, float]]:
    """Each size through `api` on a freshly started copy of the target, so that a peak does not
    carry over from an earlier workload or size."""

    def run(ctx: Context, target: Target) -> dict[str, float]:
        figures = {}
        for size in ctx.sizes.memory:
            payload = ctx.pattern.payload(size)
            server = target.fresh()
            workdir = ctx.workdir / f"{target.key}-memory-{api}-{size}"
            workdir.mkdir()
            try:
                server.start(workdir)
                conn = server.connect()
                with Monitor(server) as monitor:
                    if api == "seed":
                        handle = seed_post(conn, payload)
                        wait_completed(conn, handle, completion_timeout(size))
                    else:
                        handle = tus_upload(conn, TUS_ENDPOINT, payload, DEFAULT_PATCH).location
                conn.close()
                ctx.check_later(server, f"memory {api}", api, handle, payload)
                ctx.verify()
            finally:
                server.stop()
                shutil.rmtree(workdir, ignore_errors=True)
            # The largest size's PSS and CPU figures are the ones that stay.
            figures[f"rss-{api}-{size // MiB}"] = monitor.peak_rss / MiB
            figures[f"pss-{api}"] = monitor.peak_pss / MiB
            figures[f"cpu-{api}"] = monitor.cpu_seconds / (size / GiB)
        return figures

    return run


def _needs(api: str) -> Callable[[Target], bool]:
    return lambda target: api in target.apis


def _throughput_target(api: str) -> Callable[[Target], bool]:
    """Targets that speak `api`, and the disk ceiling (same bytes, written sequentially)."""
    return lambda target: api in target.apis or "disk" in target.apis


def workloads(sizes: Sizes) -> list[Workload]:
    """Every workload, in table order."""
    single = [
        Workload(
            f"tus-{patch // MiB}",
            f"tus, one file, {size_text(patch)} PATCHes",
            lambda s, patch=patch: [
                Metric(
                    f"tus-{patch // MiB}",
                    f"tus 1x{size_text(s.single)}, {size_text(patch)} PATCHes",
                    "MiB/s",
                    vs_ceiling=True,
                )
            ],
            _tus_single(patch),
            _throughput_target("tus"),
            lambda s: s.single,
        )
        for patch in sizes.patches
    ]
    return [
        Workload(
            "seed",
            "seed API, one file",
            _seed_metrics,
            _seed,
            _throughput_target("seed"),
            lambda s: s.seed,
        ),
        *single,
        Workload(
            "concurrent",
            "tus, concurrent uploads, with status and HEAD latency",
            _concurrent_metrics,
            _concurrent,
            _throughput_target("tus"),
            lambda s: s.concurrent[0] * s.concurrent[1],
        ),
        Workload(
            "small",
            "tus, many small uploads",
            _small_metrics,
            _small,
            _needs("tus"),
            lambda s: s.small[0] * s.small[1],
        ),
        Workload(
            "cut",
            "tus-js-client defaults through a connection cut every few MiB",
            _cut_metrics,
            _cut,
            lambda target: target.verifiable and "tus" in target.apis,
        ),
        Workload(
            "slow",
            "a fast tus upload among many slow connections, and memory with partial bodies",
            _slow_metrics,
            _slow,
            lambda target: target.verifiable and "tus" in target.apis,
        ),
        *(
            Workload(
                f"memory-{api}",
                f"peak memory and CPU per GiB, {api}",
                _memory_metrics(api),
                _memory(api),
                lambda target, api=api: target.verifiable and api in target.apis,
            )
            for api in ("seed", "tus")
        ),
    ]


def describe(sizes: Sizes) -> dict[str, Any]:
    return {name: getattr(sizes, name) for name in sizes.__dataclass_fields__}
