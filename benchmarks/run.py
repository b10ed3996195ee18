"""Benchmark upload_server against @tus/server and the machine's limits: one command.

    python benchmarks/run.py [--quick] [--json OUT] [--only WORKLOAD,...] [--targets TARGET,...]

Starts every target on free 127.0.0.1 ports in a temporary directory, runs each workload against
each target (repetitions interleaved, target order rotated), verifies every upload byte for byte,
stops everything, prints the table and then the JSON document. Exits 1 if any upload failed or
was corrupt, 2 on bad arguments. Timings are reported, never asserted. See docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from client import Pattern, Unsupported
from cpu import ProcessCpu, with_cpu_rows
from goals import goals, goals_json, goals_table
from pyspy import Profile
from report import Results, document, summary, table
from targets import Skipped, Target, TusNode, UploadServer, all_targets
from workloads import FULL, QUICK, Context, Incomplete, Workload, workloads

HERE = Path(__file__).resolve().parent
PROFILES: list[str] = []  # what --profile found, printed after the tables


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [f"{w.name} ({w.title})" for w in workloads(FULL)]
    keys = [t.key for t in all_targets()]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition (CI)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the JSON here")
    parser.add_argument(
        "--only",
        metavar="WORKLOAD,...",
        help=f"workloads to run, by name or prefix: {'; '.join(names)} (default: all)",
    )
    parser.add_argument(
        "--targets", metavar="TARGET,...", help=f"targets to run: {', '.join(keys)} (default: all)"
    )
    parser.add_argument("--reps", type=int, help="repetitions (default: 3, or 1 with --quick)")
    parser.add_argument(
        "--profile",
        type=Path,
        nargs="?",
        const=HERE / "results" / "profiles" / time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime()),
        metavar="DIR",
        help="py-spy on upload_server's front end and writers in each workload's first "
        "repetition; stacks written to DIR (default: benchmarks/results/profiles/<time>)",
    )
    return parser.parse_args(argv)


def _select(items: list[Any], spec: str | None, name: str, what: str) -> list[Any]:
    if not spec:
        return items
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    chosen = [i for i in items if any(getattr(i, name).startswith(w) for w in wanted)]
    unknown = [w for w in wanted if not any(getattr(i, name).startswith(w) for i in items)]
    if unknown or not chosen:
        choices = ", ".join(getattr(i, name) for i in items)
        raise ValueError(f"unknown {what} {', '.join(unknown)} (choose from {choices})")
    return chosen


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def start_targets(
    ctx: Context, results: Results, targets: list[Target], started: list[Target]
) -> None:
    """Start each target into `started`. One that cannot run on this machine is left out with a
    message; one that fails to start counts as a failure; neither stops the run."""
    for target in targets:
        try:
            target.start(ctx.workdir / target.key)
        except Skipped as exc:
            _progress(f"skipping {target.label}: {exc}")
            results.note(None, target, f"skipped: {exc}")
            continue
        except Exception as exc:
            target.stop()
            _progress(f"{target.label} did not start: {exc}")
            ctx.fail(target, "start", f"did not start: {exc}")
            results.note(None, target, "failed: did not start")
            continue
        _progress(f"started {target.label} on port {target.port or '-'}")
        started.append(target)


def run_one(
    ctx: Context, workload: Workload, target: Target, profile: Path | None
) -> dict[str, float]:
    """One repetition of `workload` on `target`; for a server and a workload that moves a known
    volume, with the CPU each process of the server's tree used during it (cpu.py), and under
    py-spy when `profile` names a directory (upload_server only; pyspy.py)."""
    if workload.volume is None or not isinstance(target, UploadServer | TusNode):
        return workload.run(ctx, target)
    with contextlib.ExitStack() as stack:
        if profile is not None and isinstance(target, UploadServer):
            stack.enter_context(Profile(target, workload.name, profile, PROFILES))
        usage = stack.enter_context(ProcessCpu(target))
        figures = workload.run(ctx, target)
    return figures | usage.figures(workload.name, workload.volume(ctx.sizes))


def run_workloads(
    ctx: Context,
    results: Results,
    chosen: list[Workload],
    targets: list[Target],
    profile: Path | None = None,
) -> None:
    reps = ctx.sizes.reps
    for rep in range(reps):
        order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
        for workload in chosen:
            for target in order:
                if not workload.applies(target):
                    continue
                os.sync()  # start each measurement with no dirty pages left by the one before
                began = time.monotonic()
                try:
                    figures = run_one(ctx, workload, target, profile if rep == 0 else None)
                except Unsupported as exc:
                    results.note(workload, target, f"unsupported: {exc}")
                    outcome = f"unsupported ({exc})"
                except Skipped as exc:  # what the workload needs cannot run on this machine
                    results.note(workload, target, f"skipped: {exc}")
                    outcome = f"skipped ({exc})"
                except Incomplete as exc:  # failed, with figures all the same
                    if not exc.counted:
                        ctx.fail(target, workload.name, str(exc))
                    results.add(workload, target, exc.figures)
                    results.note(workload, target, f"failed: {exc}")
                    figures = ", ".join(f"{k} {v:.1f}" for k, v in exc.figures.items())
                    outcome = f"FAILED ({exc}; {figures})"
                except Exception as exc:
                    ctx.fail(target, workload.name, f"{exc!r}")
                    results.note(workload, target, f"failed: {exc!r}")
                    outcome = f"FAILED ({exc!r})"
                else:
                    results.add(workload, target, figures)
                    outcome = ", ".join(
                        f"{k} {v:.1f}"
                        for k, v in figures.items()
                        if "-cpu-" not in k and "-busy-" not in k
                    )
                ctx.verify()
                took = time.monotonic() - began
                _progress(
                    f"[{rep + 1}/{reps}] {workload.name} · {target.label}: {outcome} ({took:.1f}s)"
                )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.reps:
        sizes = type(sizes)(**{**sizes.__dict__, "reps": args.reps})
    try:
        chosen = _select(
            [with_cpu_rows(w) for w in workloads(sizes)], args.only, "name", "workload"
        )
        targets = _select(all_targets(), args.targets, "key", "target")
    except ValueError as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 2
    if any(isinstance(t, UploadServer) for t in targets) and not importlib.util.find_spec(
        "upload_server"
    ):
        print("run.py: upload_server is not importable: pip install -e '.[test]'", file=sys.stderr)
        return 2

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    results = Results(sizes, chosen, targets)
    with tempfile.TemporaryDirectory(prefix="upload-bench-") as tmp:
        ctx = Context(sizes, Pattern(), Path(tmp))
        started: list[Target] = []
        try:
            start_targets(ctx, results, targets, started)
            run_workloads(ctx, results, chosen, started, args.profile)
        finally:
            for target in started:
                target.stop()
    doc = document(results, ctx, args.quick)
    targets_met = goals(results, args.quick)
    doc["issue16_targets"] = goals_json(targets_met)
    print(table(results))
    print()
    print(goals_table(targets_met))
    print()
    if PROFILES:
        print("Profiles (py-spy, first repetition; samples of each function's own):")
        print("\n".join(p for p in PROFILES if p))
        print()
    print(summary(results, ctx, args.quick))
    print()
    text = json.dumps(doc, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if ctx.failures:
        print(f"\n{len(ctx.failures)} failed or corrupt uploads:", file=sys.stderr)
        for failure in ctx.failures:
            print(
                f"  {failure['target']} / {failure['workload']}: {failure['problem']}",
                file=sys.stderr,
            )
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("run.py: interrupted; everything it started has been stopped", file=sys.stderr)
        sys.exit(130)
