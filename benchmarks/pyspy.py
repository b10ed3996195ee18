"""`--profile`: py-spy on upload_server's front end and writers during a workload.

Issue 16 asks for profiles taken with real tools next to the benchmark's figures. For the first
repetition of each workload on each upload_server target, `py-spy record` samples the front end
and every writer (pids from `GET /readyz`, see cpu.py) at 200 Hz without stopping them
(`--nonblocking`), and writes each process's stacks in the collapsed format
(`<workload>-<target>-<role>.collapsed.txt`: one stack a line, then its sample count), which
speedscope (https://www.speedscope.app) and flamegraph.pl read as they are. The run then prints
each process's ten functions with the most samples of their own (the leaf of the stack).
py-spy costs CPU on the machine it measures: figures of profiled repetitions are not comparable
with unprofiled ones.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from cpu import FRONT, WRITER, roles
from targets import Target

RATE = 200  # samples a second
STOP_TIMEOUT = 30.0


def py_spy() -> str | None:
    """The py-spy executable: next to this Python (the venv), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profile:
    """Context manager: py-spy on the target's front end and writers while the block runs."""

    def __init__(self, target: Target, workload: str, directory: Path, found: list[str]) -> None:
        self.found = found  # each profile's summary is appended here when it ends
        self.target = target
        self.workload = workload
        self.directory = directory
        self.recorders: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

    def __enter__(self) -> Profile:
        exe = py_spy()
        if exe is None:
            print("--profile: py-spy is not installed; nothing recorded", file=sys.stderr)
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        for pid, role in sorted(roles(self.target).items(), key=lambda item: item[1]):
            if role != FRONT and not role.startswith(WRITER):
                continue
            name = f"{self.workload}-{self.target.key}-{role.replace(' ', '-')}.collapsed.txt"
            path = self.directory / name
            command = [exe, "record", "--pid", str(pid), "--rate", str(RATE), "--nonblocking"]
            command += ["--format", "raw", "--output", str(path)]
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            self.recorders.append((role, path, process))
        return self

    def __exit__(self, *exc: object) -> None:
        for _, _, process in self.recorders:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)  # py-spy writes its output and exits
        for role, path, process in self.recorders:
            try:
                _, errors = process.communicate(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                _, errors = process.communicate()
            if not path.exists():
                message = errors.decode(errors="replace").strip().splitlines()[-1:]
                print(f"--profile: py-spy on the {role} wrote nothing {message}", file=sys.stderr)
        self.found.append(self.summary())

    def summary(self) -> str:
        """Each profiled process's ten functions with the most samples of their own."""
        lines = []
        for role, path, _ in self.recorders:
            if not path.exists():
                continue
            own, total = top_functions(path)
            lines.append(
                f"{self.workload} · {self.target.label} · {role}: {total} samples ({path})"
            )
            for count, function in own:
                lines.append(f"  {count:6d}  {100 * count / max(total, 1):5.1f}%  {function}")
        return "\n".join(lines)


def top_functions(path: Path, count: int = 10) -> tuple[list[tuple[int, str]], int]:
    """(samples, function) of the `count` leaf functions with the most samples, and the total."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        total += int(samples)
        own[stack.rsplit(";", 1)[-1]] += int(samples)
    return [(n, function) for function, n in own.most_common(count)], total
