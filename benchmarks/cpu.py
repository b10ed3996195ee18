"""CPU per process of a target's tree over one workload, by role, and how busy each one was.

Issue 16 asks for CPU seconds per GiB per process (front end, Manager, writers) next to
@tus/server's, and for a "bounded by" verdict per row. Both come from one sample of every process
of the target's tree (psutil user + system time) when the workload starts and one when it ends.

Roles of upload_server's processes come from the server itself: `GET /readyz` names the Manager's
pid and the writers' pids (with fork every child has the front end's command line, so the command
line cannot tell them apart). The pid the benchmark started is the front end (waitress); any other
process in the tree (a forkserver, the resource tracker) is "other". @tus/server is one node
process: its role is "node".
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field

import psutil
from client import GiB, RequestFailed
from targets import Target, TusNode, UploadServer
from workloads import Metric, Sizes, Workload, size_text

FRONT, MANAGER, WRITER, OTHER, NODE = "front end", "Manager", "writer", "other", "node"
# (metric suffix, label): the CPU-per-GiB rows every throughput workload gets.
CPU_ROWS = (
    ("front", "front end (waitress; node for @tus/server)"),
    ("manager", "Manager"),
    ("writers", "writers, all"),
    ("writer-max", "busiest writer"),
    ("tree", "whole server tree"),
)
# (metric suffix, what was busy): hidden rows (JSON only) for the "bounded by" verdict, as a
# share of one core (process CPU seconds / wall seconds) or, for "machine", of all cores.
BUSY_ROWS = ("busy-front", "busy-manager", "busy-writer", "busy-client", "busy-machine")


def with_cpu_rows(workload: Workload) -> Workload:
    """`workload` with its per-process CPU rows (shown) and busy shares (JSON only) added, when
    it moves a known volume of bytes through the target it runs on."""
    volume = workload.volume
    if volume is None:
        return workload
    name, base = workload.name, workload.metrics

    def metrics(sizes: Sizes) -> list[Metric]:
        what = size_text(volume(sizes))
        shown = [
            Metric(f"{name}-cpu-{suffix}", f"  CPU per GiB ({what}): {label}", "s/GiB", False)
            for suffix, label in CPU_ROWS
        ]
        hidden = [
            Metric(f"{name}-{suffix}", f"  {suffix}, share of one core", "x", False, shown=False)
            for suffix in BUSY_ROWS
        ]
        return [*base(sizes), *shown, *hidden]

    return dataclasses.replace(workload, metrics=metrics)


def roles(target: Target) -> dict[int, str]:
    """pid -> role for the target's processes that are known by pid ("writer 1", …)."""
    if target.proc is None:
        return {}
    if isinstance(target, TusNode):
        return {target.proc.pid: NODE}
    found = {target.proc.pid: FRONT}
    if isinstance(target, UploadServer):
        conn = target.connect()
        try:
            ready = conn.request("GET", "/readyz").json()
        except (OSError, RequestFailed, ValueError):
            return found  # roles unknown: everything but the front end counts as "other"
        finally:
            conn.close()
        if ready.get("managerPid"):
            found[ready["managerPid"]] = MANAGER
        for number, pid in enumerate(ready.get("writerPids") or [], 1):
            found[pid] = f"{WRITER} {number}"
    return found


@dataclass
class Snapshot:
    at: float
    machine_busy: float  # seconds all CPUs were busy since boot
    client: float  # this process's CPU seconds (the benchmark's own client threads)
    cpu: dict[int, float] = field(default_factory=dict)  # pid -> user + system seconds
    created: dict[int, float] = field(default_factory=dict)  # pid -> create_time


def snapshot(target: Target) -> Snapshot:
    machine = psutil.cpu_times()
    busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
    me = psutil.Process().cpu_times()
    shot = Snapshot(time.monotonic(), busy, me.user + me.system)
    for process in target.processes():
        with contextlib.suppress(psutil.Error), process.oneshot():
            times = process.cpu_times()
            shot.cpu[process.pid] = times.user + times.system
            shot.created[process.pid] = process.create_time()
    return shot


class ProcessCpu:
    """Context manager around one workload on one target: CPU seconds by role when it exits."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.start: Snapshot | None = None
        self.by_pid: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds)
        self.wall = 0.0
        self.client = 0.0
        self.machine = 0.0

    def __enter__(self) -> ProcessCpu:
        self.start = snapshot(self.target)
        return self

    def __exit__(self, *exc: object) -> None:
        end = snapshot(self.target)
        start = self.start
        assert start is not None
        named = roles(self.target)  # after: a writer restarted during the run has its new pid
        for pid, seconds in end.cpu.items():
            same = start.created.get(pid) == end.created.get(pid)
            used = seconds - start.cpu[pid] if same and pid in start.cpu else seconds
            self.by_pid[pid] = (named.get(pid, OTHER), max(used, 0.0))
        self.wall = max(end.at - start.at, 1e-9)
        self.client = (end.client - start.client) / self.wall
        cores = psutil.cpu_count() or 1
        busy = (end.machine_busy - start.machine_busy) / self.wall / cores
        self.machine = min(busy, 1.0)  # CPU times tick every 10 ms: a short run can read over 1

    def _seconds(self, role: str) -> list[float]:
        return [s for r, s in self.by_pid.values() if r == role or r.startswith(role + " ")]

    def figures(self, name: str, volume: int) -> dict[str, float]:
        """The workload's CPU rows for `volume` bytes moved, and its busy shares."""
        gib = volume / GiB
        front = sum(self._seconds(FRONT) + self._seconds(NODE))
        writers = self._seconds(WRITER)
        manager = self._seconds(MANAGER)
        tree = sum(s for _, s in self.by_pid.values())
        figures = {
            f"{name}-cpu-front": front / gib,
            f"{name}-cpu-tree": tree / gib,
            f"{name}-busy-front": front / self.wall,
            f"{name}-busy-client": self.client,
            f"{name}-busy-machine": self.machine,
        }
        if writers:  # upload_server only: @tus/server has no such processes
            figures |= {
                f"{name}-cpu-manager": sum(manager) / gib,
                f"{name}-cpu-writers": sum(writers) / gib,
                f"{name}-cpu-writer-max": max(writers) / gib,
                f"{name}-busy-manager": sum(manager) / self.wall,
                f"{name}-busy-writer": max(writers) / self.wall,
            }
        return figures
