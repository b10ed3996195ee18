"""What a server costs as its history of finished uploads grows (issue 15): one command.

    python benchmarks/history.py [--sizes 1000,20000,200000] [--unfinished 1000] [--json OUT]
                                 [--quick]

Measures the code of the checkout it runs from, so the same command shows before and after a
change. For each size N, in a fresh temporary upload directory:

1. Real: a server from this checkout takes a few hundred uploads over HTTP: tus
   creation-with-upload of a few bytes and seed POSTs (completed), tus creations with a length
   and no body (unfinished), and tus creations ended by DELETE (terminated).
2. Synthetic: the server is stopped and the rest of the history (N finished and `--unfinished`
   unfinished sessions in all) is written with the checkout's own store API,
   `FileSessionStore(layout.sessions).save(..., durable=False)`: copies of the real records with
   new ids, finished ones 80% completed, 10% terminated, 10% expired, last updated an hour ago.
   A synthetic completed upload's file is a hard link to its template's file. Creating 200,000
   uploads over HTTP would take over half an hour on 2 cores; this takes seconds, and what is on
   disk is whatever the checkout's store writes.
3. Measured, with `--writers 2`: the time from starting the server to `/readyz` 200 (median of
   3 restarts), the RSS of each process of the server tree once it settles, one `GET /metrics`
   (median of 20, or of as many as fit in 30 s), tus HEAD on random unfinished uploads and `GET /upload/status` on random
   completed ones (p50/p99 of 500 each), idle and then during sweeps (a server started with
   `--expiry 2s` sweeps every 0.5 s, so its sweeper walks the history back to back while the
   requests run), and the disk use of the records.

Then the ratio of each figure at the largest N to the smallest, against the issue's goal (flat
within 25%; disk use is expected to grow). Prints the table and the JSON document. Exits 1 if a
request failed or answered wrongly, 2 on bad arguments; timings never change it. `--quick` (sizes
200 and 1000, few requests) is for CI.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import http.client
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from client import TUS, Connection, RequestFailed, Response, expect, tus_create
from slow import wait_quiet
from targets import REPO, UploadServer, free_port

from upload_server.layout import Layout
from upload_server.sessions import lifecycle
from upload_server.sessions import record as states
from upload_server.sessions.record import new_session_id
from upload_server.sessions.store import FileSessionStore

FLAGS = ["--writers", "2"]
SWEEP_FLAGS = ["--expiry", "2s"]  # runtime.sweep_interval: expiry / 4, at least 0.5 s
READY_TIMEOUT = 900.0  # a start-up that reads every record of a big history is slow
SCRAPE_BUDGET = 30.0  # seconds
GOAL = 1.25  # the "flat within 25%"
FINISHED_MIX = ((states.COMPLETED, 0.8), (states.TERMINATED, 0.1), (states.EXPIRED, 0.1))
HISTORY_AGE = 3600.0  # synthetic finished sessions were last updated this long ago
BODY = b"history!"


@dataclass(frozen=True)
class Plan:
    sizes: list[int]
    unfinished: int
    real_tus: int  # completed by tus creation-with-upload
    real_seed: int  # completed by seed POST
    real_open: int  # tus created with a length, never sent a byte
    real_terminated: int  # tus created, then DELETE
    restarts: int
    scrapes: int
    requests: int


FULL = Plan([1000, 20000, 200000], 1000, 100, 100, 100, 20, 3, 20, 500)
QUICK = Plan([200, 1000], 100, 20, 20, 20, 5, 1, 5, 100)


@dataclass
class Failures:
    """Requests that failed or answered wrongly; any makes the exit status 1."""

    problems: list[str] = field(default_factory=list)

    def add(self, problem: str) -> None:
        if len(self.problems) < 50:
            print(f"FAILED: {problem}", file=sys.stderr, flush=True)
        self.problems.append(problem)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the history --------------------------------------------------------------------------------


def seed_post(conn: Connection, filename: str) -> str:
    boundary = "history-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + BODY
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = conn.request(
        "POST",
        "/upload",
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        [body],
        len(body),
    )
    return expect(response, (201,), "POST /upload").json()["sessionID"]


def tus_create_with_upload(conn: Connection, filename: str) -> str:
    encoded = base64.b64encode(filename.encode()).decode()
    response = conn.request(
        "POST",
        "/files/",
        {
            **TUS,
            "Upload-Length": str(len(BODY)),
            "Upload-Metadata": f"filename {encoded}",
            "Content-Type": "application/offset+octet-stream",
        },
        [BODY],
        len(BODY),
    )
    expect(response, (201,), "POST /files/ with the upload")
    if response.headers.get("upload-offset") != str(len(BODY)):
        raise RequestFailed(f"creation-with-upload: Upload-Offset {response.headers}")
    return response.headers["location"].rstrip("/").rsplit("/", 1)[-1]


def create_real(server: UploadServer, plan: Plan) -> list[str]:
    """The real part of the history, over HTTP; its session ids. Completed uploads are waited
    for, so the records on disk are settled when the server stops."""
    conn = server.connect()
    try:
        ids = [tus_create_with_upload(conn, f"tus-{i}.bin") for i in range(plan.real_tus)]
        ids += [seed_post(conn, f"seed-{i}.bin") for i in range(plan.real_seed)]
        others = [
            tus_create(conn, "/files/", len(BODY), f"open-{i}.bin") for i in range(plan.real_open)
        ]
        for i in range(plan.real_terminated):
            location = tus_create(conn, "/files/", len(BODY), f"gone-{i}.bin")
            expect(conn.request("DELETE", location, dict(TUS)), (204,), f"DELETE {location}")
            others.append(location)
        deadline = time.monotonic() + 60
        for session_id in ids:
            while True:
                response = conn.request("GET", f"/upload/status?sessionID={session_id}")
                state = expect(response, (200,), "GET /upload/status").json()["state"]
                if state == states.COMPLETED:
                    break
                if state in states.FINAL_STATES or time.monotonic() > deadline:
                    raise RequestFailed(f"upload {session_id}: {state}, not completed")
                time.sleep(0.02)
    finally:
        conn.close()
    return ids + [location.rstrip("/").rsplit("/", 1)[-1] for location in others]


@dataclass
class History:
    """The ids the requests pick from at random."""

    open: list[str]
    completed: list[str]


def add_synthetic(
    layout: Layout, real_ids: list[str], finished: int, unfinished: int, rng: random.Random
) -> History:
    """Fill the history up to `finished` finished and `unfinished` unfinished sessions with
    copies of the real records (`real_ids`), written by the checkout's store."""
    store = FileSessionStore(layout.sessions)
    real = [s for s in map(store.load, real_ids) if s is not None]
    completed = [s for s in real if s.state == states.COMPLETED]
    terminated = [s for s in real if s.state == states.TERMINATED]
    open_ = [s for s in real if not s.is_final]
    if not (completed and terminated and open_):
        raise RuntimeError(f"the real uploads left no templates: {[s.state for s in real]}")
    history = History([s.id for s in open_], [s.id for s in completed])
    now = time.time()
    for _ in range(unfinished - len(open_)):
        session = copy.deepcopy(rng.choice(open_))
        session.id = new_session_id()
        session.created_at = session.updated_at = now
        session.expires_at = now + 86400
        store.save(session, durable=False)
        history.open.append(session.id)
    states_, weights = zip(*FINISHED_MIX, strict=True)
    for index in range(finished - len(completed) - len(terminated)):
        state = rng.choices(states_, weights)[0]
        template = rng.choice(completed if state == states.COMPLETED else terminated + open_)
        session = copy.deepcopy(template)
        session.id = new_session_id()
        session.created_at = now - HISTORY_AGE - 60
        if state == states.COMPLETED:
            name = f"history-{index}.bin"
            os.link(layout.root / template.location, layout.root / name)
            session.filename = session.location = name
            history.completed.append(session.id)
        elif session.state != state:
            ended_by = lifecycle.TERMINATE if state == states.TERMINATED else lifecycle.EXPIRE
            lifecycle.end(session, ended_by)
        session.updated_at = now - HISTORY_AGE
        store.save(session, durable=False)
    return history


# -- the measurements ---------------------------------------------------------------------------


def start_timed(server: UploadServer, workdir: Path, flags: list[str]) -> float:
    """Start `server` on `workdir` with `flags`; seconds from the spawn to `/readyz` 200."""
    server.workdir, server.flags, server.port = workdir, flags, free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPLOAD_SERVER_")}
    env.pop("PORT", None)
    began = time.perf_counter()
    server._spawn(server.command(), cwd=REPO, env=env)
    assert server.proc is not None
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log_tail()}")
        conn = server.connect()
        try:
            if conn.request("GET", "/readyz").status == 200:
                return time.perf_counter() - began
        except OSError:
            pass  # not listening yet
        finally:
            conn.close()
        if time.perf_counter() - began > READY_TIMEOUT:
            raise RuntimeError(f"not ready after {READY_TIMEOUT:.0f}s:\n{server.log_tail()}")
        time.sleep(0.02)


def vm_rss(pid: int) -> float:
    """MiB, from /proc (what the kernel charges the process, shared pages included)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_tree(server: UploadServer) -> dict[str, float]:
    """RSS per process: the front end, then its children in the order they started (the Manager
    first, then the writers; multiprocessing's helpers named by their command line)."""
    root, *children = server.processes()
    rss = {"front end": vm_rss(root.pid)}
    writers = 0
    for child in sorted(children, key=lambda p: p.create_time()):
        cmdline = " ".join(child.cmdline())
        if "resource_tracker" in cmdline:
            name = "resource tracker"
        elif "forkserver" in cmdline:
            name = "forkserver"
        elif "manager" not in rss:
            name = "manager"
        else:
            writers += 1
            name = f"writer {writers}"
        rss[name] = vm_rss(child.pid)
    return rss


def timed(
    conn: Connection,
    failures: Failures,
    method: str,
    path: str,
    check: Callable[[Response], str | None],
) -> float:
    """Milliseconds for one request; an exception or a wrong answer is a failure."""
    began = time.perf_counter()
    try:
        response = conn.request(method, path, dict(TUS))
        took = (time.perf_counter() - began) * 1000
        problem = check(response)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        took, problem = (time.perf_counter() - began) * 1000, repr(exc)
    if problem:
        failures.add(f"{method} {path}: {problem}")
    return took


def head_ok(response: Response) -> str | None:
    if response.status != 200 or response.headers.get("upload-offset") != "0":
        return f"HTTP {response.status}, Upload-Offset {response.headers.get('upload-offset')}"
    return None


def status_ok(response: Response) -> str | None:
    if response.status != 200:
        return f"HTTP {response.status} {response.body[:200]!r}"
    body = response.json()
    if body.get("state") != states.COMPLETED or not body.get("storedAs"):
        return f"state {body.get('state')}, storedAs {body.get('storedAs')}"
    return None


def metrics_ok(response: Response) -> str | None:
    return None if response.status == 200 else f"HTTP {response.status}"


def scrape(server: UploadServer, count: int, failures: Failures) -> list[float]:
    """`count` scrapes of /metrics, or as many as fit in SCRAPE_BUDGET (at least 3): where one
    scrape takes seconds, 20 would take minutes and tell nothing more."""
    conn = server.connect()
    began, took = time.monotonic(), []
    try:
        while len(took) < count and (len(took) < 3 or time.monotonic() - began < SCRAPE_BUDGET):
            took.append(timed(conn, failures, "GET", "/metrics", metrics_ok))
    finally:
        conn.close()
    return took


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def latencies(
    server: UploadServer,
    plan: Plan,
    ids: History,
    failures: Failures,
    rng: random.Random,
    phase: str,
) -> dict[str, float]:
    """HEAD on random unfinished uploads and status of random completed ones, interleaved; and
    the CPU the server tree used meanwhile (a sweep shows there)."""
    cpu_before, wall_before = tree_cpu(server), time.perf_counter()
    conn = server.connect()
    head: list[float] = []
    status: list[float] = []
    try:
        for _ in range(plan.requests):
            path = f"/files/{rng.choice(ids.open)}"
            head.append(timed(conn, failures, "HEAD", path, head_ok))
            path = f"/upload/status?sessionID={rng.choice(ids.completed)}"
            status.append(timed(conn, failures, "GET", path, status_ok))
    finally:
        conn.close()
    cpu = (tree_cpu(server) - cpu_before) / (time.perf_counter() - wall_before)
    return {
        f"server_cpu_{phase}_pct": cpu * 100,
        f"head_{phase}_p50_ms": percentile(head, 0.5),
        f"head_{phase}_p99_ms": percentile(head, 0.99),
        f"status_{phase}_p50_ms": percentile(status, 0.5),
        f"status_{phase}_p99_ms": percentile(status, 0.99),
    }


def tree_cpu(server: UploadServer) -> float:
    """CPU seconds (user and system) the server's processes have used so far."""
    total = 0.0
    for process in server.processes():
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def records_disk(layout: Layout) -> tuple[int, float]:
    """How many files the record store holds, and the MiB of disk they take (allocated blocks,
    everything under the internal folder but the spool and partial data)."""
    count, blocks = 0, 0
    skip = {layout.spool_dir, layout.partial_dir}
    for directory, subdirs, files in os.walk(layout.internal):
        subdirs[:] = [d for d in subdirs if Path(directory, d) not in skip]
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                blocks += os.stat(os.path.join(directory, name)).st_blocks
                count += 1
    return count, blocks * 512 / 2**20


def measure_size(
    size: int, plan: Plan, tmp: Path, failures: Failures, rng: random.Random
) -> dict[str, Any]:
    """Build a history of `size` finished uploads in a fresh directory and measure a server on it."""
    began = time.monotonic()
    workdir = tmp / f"n{size}"
    server = UploadServer("history", f"upload_server {size}")
    layout = Layout(workdir / "uploads")
    result: dict[str, Any] = {"finished": size, "unfinished": plan.unfinished}
    try:
        start_timed(server, workdir, FLAGS)
        real_ids = create_real(server, plan)
        server.stop()
        real = plan.real_tus + plan.real_seed + plan.real_terminated
        history = add_synthetic(layout, real_ids, size, plan.unfinished, rng)
        result["real_uploads"] = real + plan.real_open
        result["synthetic_records"] = size + plan.unfinished - real - plan.real_open
        result["build_s"] = time.monotonic() - began
        progress(f"n={size}: history built in {result['build_s']:.1f}s; restarting")
        starts = []
        for _ in range(plan.restarts):
            server.stop()
            starts.append(start_timed(server, workdir, FLAGS))
        result["restart_s"] = statistics.median(starts)
        result["restarts_s"] = starts
        wait_quiet(server.processes, timeout=60)
        result["rss_mib"] = rss_tree(server)
        result["rss_total_mib"] = sum(result["rss_mib"].values())
        scrapes = scrape(server, plan.scrapes, failures)
        result["metrics_ms"] = statistics.median(scrapes)
        result["metrics_scrapes"] = len(scrapes)
        result.update(latencies(server, plan, history, failures, rng, "idle"))
        server.stop()
        progress(f"n={size}: idle figures taken; a server that sweeps every 0.5 s")
        result["sweep_start_s"] = start_timed(server, workdir, FLAGS + SWEEP_FLAGS)
        time.sleep(1.0)  # the first sweep has begun
        result.update(latencies(server, plan, history, failures, rng, "sweep"))
    finally:
        server.stop()
    result["record_files"], result["records_disk_mib"] = records_disk(layout)
    result["took_s"] = time.monotonic() - began
    progress(f"n={size}: done in {result['took_s']:.1f}s")
    return result


# -- the report ---------------------------------------------------------------------------------

# (key, label, judged against the goal): disk use grows with the history by design.
FIGURES = [
    ("rss_front_mib", "RSS front end (MiB)", True),
    ("rss_manager_mib", "RSS Manager (MiB)", True),
    ("rss_writer_mib", "RSS largest writer (MiB)", True),
    ("rss_total_mib", "RSS whole tree (MiB)", True),
    ("restart_s", "restart to /readyz 200 (s, median)", True),
    ("metrics_ms", "one GET /metrics (ms, median)", True),
    ("head_idle_p50_ms", "HEAD idle p50 (ms)", True),
    ("head_idle_p99_ms", "HEAD idle p99 (ms)", True),
    ("status_idle_p50_ms", "status idle p50 (ms)", True),
    ("status_idle_p99_ms", "status idle p99 (ms)", True),
    ("head_sweep_p50_ms", "HEAD during sweeps p50 (ms)", True),
    ("head_sweep_p99_ms", "HEAD during sweeps p99 (ms)", True),
    ("status_sweep_p50_ms", "status during sweeps p50 (ms)", True),
    ("status_sweep_p99_ms", "status during sweeps p99 (ms)", True),
    ("server_cpu_idle_pct", "server tree CPU while measuring idle (%)", False),
    ("server_cpu_sweep_pct", "server tree CPU while measuring during sweeps (%)", False),
    ("records_disk_mib", "records on disk (MiB)", False),
    ("took_s", "this size took (s)", False),
]


def flatten(result: dict[str, Any]) -> dict[str, float]:
    rss = result["rss_mib"]
    writers = [v for k, v in rss.items() if k.startswith("writer")]
    return {
        **{k: v for k, v in result.items() if isinstance(v, float)},
        "rss_front_mib": rss.get("front end", 0.0),
        "rss_manager_mib": rss.get("manager", 0.0),
        "rss_writer_mib": max(writers, default=0.0),
    }


def verdicts(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each figure at the largest size over the smallest, and whether it is within the goal."""
    first, last = flatten(results[0]), flatten(results[-1])
    out = {}
    for key, _, judged in FIGURES:
        ratio = last[key] / first[key] if first.get(key) else None
        met = None if not judged or ratio is None else ratio <= GOAL
        out[key] = {"ratio": ratio, "met": met}
    return out


def table(results: list[dict[str, Any]], judged: dict[str, dict[str, Any]]) -> str:
    sizes = [f"{r['finished']:,} finished" for r in results]
    lines = [
        f"| figure | {' | '.join(sizes)} | largest / smallest | flat within 25% |",
        "|---" * (len(sizes) + 3) + "|",
    ]
    rows = [flatten(r) for r in results]
    for key, label, judge in FIGURES:
        cells = " | ".join(
            f"{row[key]:.3g}" if row[key] < 100 else f"{row[key]:,.0f}" for row in rows
        )
        ratio = judged[key]["ratio"]
        met = judged[key]["met"]
        verdict = "met" if met else "missed" if met is not None else "-"
        shown = f"{ratio:.2f}x" if ratio is not None else "-"
        lines.append(f"| {label} | {cells} | {shown} | {verdict if judge else '-'} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", metavar="N,...", help="finished uploads per history")
    parser.add_argument("--unfinished", type=int, help="unfinished uploads in every history")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the JSON here")
    parser.add_argument("--quick", action="store_true", help="sizes 200,1000, few requests (CI)")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    sizes = [int(n) for n in args.sizes.split(",")] if args.sizes else plan.sizes
    unfinished = plan.unfinished if args.unfinished is None else args.unfinished
    least_finished = plan.real_tus + plan.real_seed + plan.real_terminated
    if min(sizes) < least_finished or unfinished < plan.real_open:
        raise ValueError(
            f"every size needs at least {least_finished} finished uploads and --unfinished at "
            f"least {plan.real_open}: that many are made over HTTP"
        )
    return Plan(sorted(sizes), unfinished, *list(plan.__dict__.values())[2:])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = make_plan(args)
    except ValueError as exc:
        print(f"history.py: {exc}", file=sys.stderr)
        return 2

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    failures = Failures()
    rng = random.Random(15)
    results = []
    with tempfile.TemporaryDirectory(prefix="upload-history-") as tmp:
        for size in plan.sizes:
            try:
                results.append(measure_size(size, plan, Path(tmp), failures, rng))
            except (
                RequestFailed,
                RuntimeError,
                OSError,
                http.client.HTTPException,
                subprocess.SubprocessError,
            ) as exc:
                failures.add(f"n={size}: {exc}")
            shutil.rmtree(Path(tmp) / f"n{size}", ignore_errors=True)
    judged = verdicts(results) if len(results) > 1 else {}
    doc = {
        "script": "benchmarks/history.py",
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git_head(),
        "cpus": os.cpu_count(),
        "flags": FLAGS,
        "sweep_flags": SWEEP_FLAGS,
        "synthetic": (
            "all but the real uploads: records written by FileSessionStore.save from copies of "
            "the real ones; completed files are hard links"
        ),
        "plan": plan.__dict__,
        "results": results,
        "ratios": judged,
        "failures": failures.problems,
    }
    if judged:
        print(table(results, judged))
        print()
    print(
        f"Real: {plan.real_tus + plan.real_seed + plan.real_open + plan.real_terminated} uploads "
        "over HTTP per size; synthetic: every other record (written with the checkout's "
        "FileSessionStore). 'During sweeps': a server started with --expiry 2s, sweeping every "
        "0.5 s."
    )
    print()
    text = json.dumps(doc, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if failures.problems:
        print(f"\n{len(failures.problems)} requests failed or answered wrongly", file=sys.stderr)
        return 1
    return 0


def git_head() -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("history.py: interrupted; everything it started has been stopped", file=sys.stderr)
        sys.exit(130)
