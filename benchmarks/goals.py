"""Issue 16's targets, one line per goal and workload, each with a verdict and a "bounded by".

Every figure is a median of the same run (report.Results). Timings are never judged in a quick run
(the sizes are too small to mean anything): the verdict says `[quick: not judged]`. A goal whose
workload or target was not run says `[n/a: why]`. "Bounded by" names what limited an upload_server
figure, from measurements of the same run (the rule is in docs/PERFORMANCE.md and `bounded_by`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import psutil
from report import TUS_NODE, Results, Row
from workloads import workloads

NOSYNC, DEFAULTS = "nosync", "defaults"
CONFIG = {NOSYNC: "--fsync never", DEFAULTS: "defaults"}
# (rate metric, @tus/server's metric it is compared with): the throughput rows. The seed API is
# compared with @tus/server's 1 GiB tus stream in 8 MiB PATCHes (it has no seed API).
THROUGHPUT = (
    ("seed", "tus-8"),
    ("tus-8", "tus-8"),
    ("tus-32", "tus-32"),
    ("concurrent", "concurrent"),
    ("small-rate", "small-rate"),
)
WORKLOAD_OF = {"seed": "seed", "tus-8": "tus-8", "tus-32": "tus-32"}
WORKLOAD_OF |= {"concurrent": "concurrent", "small-rate": "small"}
SINGLE = ("seed", "tus-8", "tus-32")
SATURATED = 0.8  # a rate at 80% of the loopback or disk rate is bounded by it
BUSY = 0.9  # a process using 90% of one core over the workload is bounded by its CPU
FLAT = 1.10  # peak RSS at the largest size within 10% of the smallest size's
LATENCY_MS = 20.0


@dataclass
class Goal:
    row: str  # the goal, the workload and the configuration it measures
    measured: str
    target: str
    verdict: str  # [met], [MISSED], [n/a: why], [quick: not judged]
    bounded_by: str
    value: float | None  # the figure judged (a ratio, ms or a growth factor)


class Judge:
    """The figures of one run, looked up by metric and target key."""

    def __init__(self, results: Results, quick: bool) -> None:
        self.results = results
        self.quick = quick
        self.rows = {row.metric.key: row for row in results.rows}
        sizes = results.sizes
        self.labels = {m.key: m.label.strip() for w in workloads(sizes) for m in w.metrics(sizes)}

    def row(self, metric: str) -> Row | None:
        return self.rows.get(metric)

    def median(self, metric: str, key: str) -> float | None:
        row = self.rows.get(metric)
        return row.median(key) if row else None

    def missing(self, metric: str, key: str) -> str | None:
        """Why `metric` has no figure for target `key`, or None if it has one."""
        row = self.rows.get(metric)
        if row is None:
            return "[n/a: workload not run]"
        cell = row.cells.get(key)
        if cell is None:
            return f"[n/a: {key} not run]"
        if cell.median is None:
            return f"[n/a: {key} {(cell.note or 'no figure').split(':')[0]}]"
        return None

    def verdict(self, ok: bool) -> str:
        if self.quick:
            return "[quick: not judged]"
        return "[met]" if ok else "[MISSED]"

    def goal(
        self,
        row: str,
        needs: list[tuple[str, str]],
        target: str,
        judge: Callable[[], tuple[float, str, bool]],
        bounded: Callable[[], str] = lambda: "—",
    ) -> Goal:
        """A goal line: n/a when a figure it `needs` (metric, target key) is missing, else
        `judge()`'s (value, text, met)."""
        for metric, key in needs:
            why = self.missing(metric, key)
            if why:
                return Goal(row, "—", target, why, "—", None)
        value, text, ok = judge()
        return Goal(row, text, target, self.verdict(ok), bounded(), value)


def _pct(value: float) -> str:
    return f"{value * 100:.0f}%"


def bounded_by(judge: Judge, metric: str, key: str) -> str:
    """What limited `key`'s rate in `metric`'s workload, from the same run's figures."""
    name = WORKLOAD_OF[metric]
    rate = judge.median(metric, key)
    if rate is None:
        return "—"
    # --fsync never writes into the page cache: the disk's synced rate does not bound it.
    ceilings = [("loopback", "loopback/the client")] + [("disk", "the disk")] * (key != NOSYNC)
    for ceiling, what in ceilings:
        limit = judge.median(metric, ceiling)
        if limit and rate >= SATURATED * limit:
            return f"{what} ({rate / limit:.2f}x of it)"
    busy = {
        role: share
        for role, suffix in (("front end", "front"), ("Manager", "manager"), ("a writer", "writer"))
        if (share := judge.median(f"{name}-busy-{suffix}", key)) is not None
    }
    if not busy:
        return "— (no CPU figures)"
    role, share = max(busy.items(), key=lambda item: item[1])
    if share >= BUSY:
        return f"one process's CPU: {role} ({_pct(share)} of a core)"
    client = judge.median(f"{name}-busy-client", key) or 0.0
    if client >= BUSY:
        return f"the client's CPU ({_pct(client)} of a core)"
    shares = f"busiest: {role} {_pct(share)}, client {_pct(client)}"
    machine = judge.median(f"{name}-busy-machine", key)
    if machine is not None and machine >= BUSY:
        return f"all {psutil.cpu_count()} cores ({_pct(machine)} busy; {shares})"
    return f"latency/hand-offs (no resource saturated; {shares})"


def _vs_tus(judge: Judge, metric: str, theirs: str, key: str, goal: float) -> Goal:
    label = judge.labels.get(metric, metric)
    against = "" if metric == theirs else f" (against its {judge.labels.get(theirs, theirs)})"
    row = f"{label}, {CONFIG[key]} vs @tus/server{against}"

    def judged() -> tuple[float, str, bool]:
        mine, tus = judge.median(metric, key), judge.median(theirs, TUS_NODE)
        assert mine is not None and tus is not None
        ratio = mine / tus
        unit = judge.rows[metric].metric.unit
        return ratio, f"{ratio:.2f}x ({mine:.1f} vs {tus:.1f} {unit})", ratio >= goal

    needs = [(metric, key), (theirs, TUS_NODE)]
    return judge.goal(row, needs, f">= {goal:.1f}x", judged, lambda: bounded_by(judge, metric, key))


def _vs_ceiling(judge: Judge, metric: str) -> Goal:
    row = f"{judge.labels.get(metric, metric)}, defaults vs min(loopback, disk)"

    def judged() -> tuple[float, str, bool]:
        found = judge.rows[metric]
        mine, ceiling = found.median(DEFAULTS), found.ceiling()
        assert mine is not None and ceiling is not None
        which = "loopback" if ceiling == found.median("loopback") else "disk"
        ratio = mine / ceiling
        return ratio, f"{ratio:.2f}x ({mine:.1f} vs {which} {ceiling:.1f} MiB/s)", ratio >= 0.6

    found = judge.row(metric)
    if found is not None and found.median(DEFAULTS) is not None and found.ceiling() is None:
        return Goal(row, "—", ">= 0.6x", "[n/a: loopback and disk not run]", "—", None)
    return judge.goal(
        row, [(metric, DEFAULTS)], ">= 0.6x", judged, lambda: bounded_by(judge, metric, DEFAULTS)
    )


def _cpu(judge: Judge, metric: str, theirs: str) -> Goal:
    name, tus_name = WORKLOAD_OF[metric], WORKLOAD_OF[theirs]
    against = "" if name == tus_name else f" (against its {judge.labels.get(theirs, theirs)})"
    row = f"CPU per GiB, whole tree, {judge.labels.get(metric, metric)}, defaults vs @tus/server"
    row += against
    mine_key, tus_key = f"{name}-cpu-tree", f"{tus_name}-cpu-tree"

    def judged() -> tuple[float, str, bool]:
        mine, tus = judge.median(mine_key, DEFAULTS), judge.median(tus_key, TUS_NODE)
        assert mine is not None and tus is not None
        parts = [
            f"{label} {value:.2f}"
            for label, suffix in (
                ("front", "front"),
                ("Manager", "manager"),
                ("writers", "writers"),
            )
            if (value := judge.median(f"{name}-cpu-{suffix}", DEFAULTS)) is not None
        ]
        ratio = mine / tus
        text = f"{ratio:.2f}x ({mine:.2f} vs node {tus:.2f} s/GiB; {', '.join(parts)})"
        return ratio, text, ratio <= 0.6

    return judge.goal(row, [(mine_key, DEFAULTS), (tus_key, TUS_NODE)], "<= 0.6x", judged)


def _latency_limit(judge: Judge, metric: str) -> Goal:
    row = f"{judge.labels.get(metric, metric)}, defaults"

    def judged() -> tuple[float, str, bool]:
        value = judge.median(metric, DEFAULTS)
        assert value is not None
        return value, f"{value:.1f} ms", value <= LATENCY_MS

    return judge.goal(row, [(metric, DEFAULTS)], f"<= {LATENCY_MS:.0f} ms", judged)


def _latency_vs_tus(judge: Judge, metric: str) -> Goal:
    small = judge.labels.get("small-rate", "small")
    row = f"{judge.labels.get(metric, metric)} in {small}, defaults vs @tus/server"

    def judged() -> tuple[float, str, bool]:
        mine, tus = judge.median(metric, DEFAULTS), judge.median(metric, TUS_NODE)
        assert mine is not None and tus is not None
        return mine, f"{mine:.1f} vs {tus:.1f} ms", mine < tus

    return judge.goal(row, [(metric, DEFAULTS), (metric, TUS_NODE)], "< @tus/server's", judged)


def _flat(judge: Judge, api: str) -> Goal:
    sizes = judge.results.sizes.memory
    smallest, largest = f"rss-{api}-{sizes[0] >> 20}", f"rss-{api}-{sizes[-1] >> 20}"
    first = judge.labels.get(smallest, smallest).removeprefix(f"peak RSS, {api} ")
    row = f"{judge.labels.get(largest, largest)} (whole tree), defaults, over {first}'s"
    target = f"<= {FLAT:.2f}x"
    if len(sizes) < 2:
        return Goal(row, "—", target, "[n/a: one size only]", "—", None)

    def judged() -> tuple[float, str, bool]:
        first, last = judge.median(smallest, DEFAULTS), judge.median(largest, DEFAULTS)
        assert first is not None and last is not None
        growth = last / first
        return growth, f"{growth:.2f}x ({first:.0f} -> {last:.0f} MiB)", growth <= FLAT

    return judge.goal(row, [(smallest, DEFAULTS), (largest, DEFAULTS)], target, judged)


def goals(results: Results, quick: bool) -> list[Goal]:
    """Every line of the issue's targets table, in the issue's order."""
    judge = Judge(results, quick)
    lines = [_vs_tus(judge, m, t, NOSYNC, 2.0) for m, t in THROUGHPUT]
    lines += [_vs_tus(judge, m, t, DEFAULTS, 1.5) for m, t in THROUGHPUT]
    lines += [_vs_ceiling(judge, m) for m in SINGLE]
    lines += [_cpu(judge, m, t) for m, t in THROUGHPUT]
    lines += [_latency_limit(judge, m) for m in ("head-p99", "status-p99")]
    lines += [_latency_vs_tus(judge, m) for m in ("small-patch-p99", "small-create-p99")]
    lines += [_flat(judge, api) for api in ("seed", "tus")]
    return lines


def goals_table(lines: list[Goal]) -> str:
    """The targets as a Markdown table."""
    heading = ["row (configuration)", "measured", "target", "verdict", "bounded by"]
    cells = [heading] + [[g.row, g.measured, g.target, g.verdict, g.bounded_by] for g in lines]
    widths = [max(len(line[i]) for line in cells) for i in range(len(heading))]

    def render(line: list[str]) -> str:
        return "| " + " | ".join(t.ljust(w) for t, w in zip(line, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    met = sum(g.verdict == "[met]" for g in lines)
    missed = sum(g.verdict == "[MISSED]" for g in lines)
    title = (
        f"Targets (issue 16): {met} met, {missed} missed, {len(lines) - met - missed} not judged"
    )
    return "\n".join([title, "", render(heading), rule, *(render(line) for line in cells[1:])])


def goals_json(lines: list[Goal]) -> list[dict[str, object]]:
    return [asdict(g) for g in lines]
