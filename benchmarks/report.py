"""Medians, ratios, the table, the issue's targets met or missed, and the JSON document.

Ratios are of medians measured in the same run. "vs tus" is how many times better an upload_server
set-up did than @tus/server (its figure over @tus/server's for rates, the inverse for latencies
and memory), so above 1.0 is better either way. "vs ceiling" is a rate over min(loopback, disk).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any

import psutil
from client import MiB
from targets import Target, UploadServer
from workloads import Context, Metric, Sizes, Workload, describe

TUS_NODE = "tus-node"
CEILINGS = ("loopback", "disk")
RSS_LIMIT_MIB = 300
FLAT_GROWTH = 1.25  # "flat": the largest file's peak within 25% of the smallest file's
LATENCY_LIMIT_MS = 50


@dataclass
class Cell:
    reps: list[float] = field(default_factory=list)
    note: str | None = None  # why there is no figure: skipped, unsupported, failed

    @property
    def median(self) -> float | None:
        return statistics.median(self.reps) if self.reps else None


@dataclass
class Row:
    workload: Workload
    metric: Metric
    cells: dict[str, Cell]

    def median(self, key: str) -> float | None:
        cell = self.cells.get(key)
        return cell.median if cell else None

    def vs_tus(self, key: str) -> float | None:
        mine, theirs = self.median(key), self.median(TUS_NODE)
        if mine is not None and mine == theirs:
            return 1.0  # a tie, also at zero (e.g. no connection closed on either)
        if mine is None or theirs is None or mine <= 0 or theirs <= 0:
            return None
        return mine / theirs if self.metric.higher_is_better else theirs / mine

    def ceiling(self) -> float | None:
        figures = [m for k in CEILINGS if (m := self.median(k)) is not None]
        return min(figures) if self.metric.vs_ceiling and figures else None

    def vs_ceiling(self, key: str) -> float | None:
        mine, ceiling = self.median(key), self.ceiling()
        return mine / ceiling if mine is not None and ceiling else None

    def client_headroom(self) -> float | None:
        """The client into the sink over the fastest server: well above 1 means the client is not
        what limits the servers."""
        if not self.metric.higher_is_better or self.median("loopback") is None:
            return None
        servers = [m for k in self.cells if k not in CEILINGS and (m := self.median(k)) is not None]
        return self.median("loopback") / max(servers) if servers else None


class Results:
    """Every repetition's figures, by metric and target."""

    def __init__(self, sizes: Sizes, workloads: list[Workload], targets: list[Target]) -> None:
        self.sizes = sizes
        self.targets = targets
        self.rows = [
            Row(w, m, {t.key: Cell() for t in targets if w.applies(t)})
            for w in workloads
            for m in w.metrics(sizes)
        ]

    def _rows(self, workload: Workload) -> list[Row]:
        return [row for row in self.rows if row.workload is workload]

    def add(self, workload: Workload, target: Target, figures: dict[str, float]) -> None:
        for row in self._rows(workload):
            if row.metric.key in figures:
                row.cells[target.key].reps.append(figures[row.metric.key])

    def note(self, workload: Workload | None, target: Target, note: str) -> None:
        """Explain missing figures (for one workload, or for every one when `workload` is None)."""
        for row in self.rows if workload is None else self._rows(workload):
            cell = row.cells.get(target.key)
            if cell is not None and cell.note is None:
                cell.note = note


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _cell_text(cell: Cell | None) -> str:
    if cell is None:
        return "n/a"
    if cell.median is None:
        return (cell.note or "—").split(":")[0]
    return _number(cell.median)


def _upload_servers(results: Results) -> list[Target]:
    return [t for t in results.targets if isinstance(t, UploadServer)]


def table(results: Results) -> str:
    """The Markdown table: rows are metrics, columns targets, then the ratio columns."""
    ours = _upload_servers(results)
    heading = ["metric", "unit", *(t.label for t in results.targets)]
    heading += [f"{t.key} vs tus" for t in ours] + [f"{t.key} vs ceiling" for t in ours]
    lines = [heading]
    for row in results.rows:
        if not row.metric.shown:
            continue  # in the JSON only
        line = [row.metric.label, row.metric.unit]
        line += [_cell_text(row.cells.get(t.key)) for t in results.targets]
        line += [_ratio(row.vs_tus(t.key)) for t in ours]
        line += [_ratio(row.vs_ceiling(t.key)) for t in ours]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(heading))]

    def render(line: list[str]) -> str:
        cells = [
            text.ljust(width) if i < 2 else text.rjust(width)
            for i, (text, width) in enumerate(zip(line, widths, strict=True))
        ]
        return "| " + " | ".join(cells) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 2)) if i < 2 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([render(lines[0]), rule, *(render(line) for line in lines[1:])])


@dataclass
class Verdict:
    target: str
    goal: str
    met: bool
    detail: str


def _goals(results: Results, key: str) -> list[tuple[str, list[tuple[bool, str]]]]:
    """Each goal of the issue with the figures it judges for one target: (met, description)."""
    vs_tus = [
        (row.metric.label.strip(), row.vs_tus(key))
        for row in results.rows
        if row.metric.shown
        and row.median(TUS_NODE) is not None
        and ("-cpu-" not in row.metric.key or row.metric.key.endswith("-cpu-tree"))
    ]
    single = [
        (row.metric.label, row.vs_ceiling(key))
        for row in results.rows
        if row.metric.vs_ceiling and (row.metric.key == "seed" or row.metric.key.startswith("tus-"))
    ]
    smallest, largest = results.sizes.memory[0] // MiB, results.sizes.memory[-1] // MiB
    peaks, growth = [], []
    for api in ("seed", "tus"):
        peak = _find(results, f"rss-{api}-{largest}", key)
        first = _find(results, f"rss-{api}-{smallest}", key)
        if peak is not None:
            peaks.append((peak < RSS_LIMIT_MIB, f"{api}: {peak:.0f} MiB"))
            if first is not None and largest != smallest:
                growth.append(
                    (peak <= FLAT_GROWTH * first, f"{api}: {first:.0f} -> {peak:.0f} MiB")
                )
    latencies = [
        (value < LATENCY_LIMIT_MS, f"{metric}: {value:.1f} ms")
        for metric in ("status-p99", "head-p99")
        if (value := _find(results, metric, key)) is not None
    ]
    return [
        (
            "every workload >= 1.0x @tus/server (aim 1.5x)",
            [(r is not None and r >= 1.0, f"{label}: {_ratio(r)}") for label, r in vs_tus],
        ),
        (
            "single-stream seed and tus >= 50% of min(loopback, disk)",
            [(r is not None and r >= 0.5, f"{label}: {_ratio(r)}") for label, r in single],
        ),
        (f"peak RSS during the largest upload < {RSS_LIMIT_MIB} MiB", peaks),
        ("peak RSS flat as the file grows (largest within 25% of smallest)", growth),
        (f"status and HEAD p99 under load < {LATENCY_LIMIT_MS} ms", latencies),
    ]


def verdicts(results: Results, ctx: Context) -> list[Verdict]:
    """The issue's goals, met or missed, for each upload_server set-up, then for the whole run."""
    found = []
    for target in _upload_servers(results):
        for goal, figures in _goals(results, target.key):
            if figures:
                misses = [text for ok, text in figures if not ok]
                detail = "; ".join(misses) or "; ".join(text for _, text in figures)
                found.append(Verdict(target.label, goal, not misses, detail))
    problems = [f"{f['target']}: {f['problem']}" for f in ctx.failures]
    detail = "; ".join(problems) or f"{ctx.verified} uploads verified byte-identical"
    found.append(Verdict("all", "zero failed or corrupt uploads", not problems, detail))
    return found


def _find(results: Results, metric: str, key: str) -> float | None:
    for row in results.rows:
        if row.metric.key == metric:
            return row.median(key)
    return None


def document(results: Results, ctx: Context, quick: bool) -> dict[str, Any]:
    """Everything measured, as one JSON-able dict."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": [os.path.basename(sys.executable), *sys.argv],
        "quick": quick,
        "machine": {
            "nproc": os.cpu_count(),
            "memory_bytes": psutil.virtual_memory().total,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "sizes": describe(results.sizes),
        "targets": {t.key: t.describe() for t in results.targets},
        "rows": [
            {
                "workload": row.workload.name,
                "metric": row.metric.key,
                "label": row.metric.label.strip(),
                "unit": row.metric.unit,
                "higher_is_better": row.metric.higher_is_better,
                "values": {
                    key: {"reps": cell.reps, "median": cell.median, "note": cell.note}
                    for key, cell in row.cells.items()
                },
                "vs_tus": {t.key: row.vs_tus(t.key) for t in _upload_servers(results)},
                "vs_ceiling": {t.key: row.vs_ceiling(t.key) for t in _upload_servers(results)},
                "ceiling": row.ceiling(),
                "client_headroom": row.client_headroom(),
            }
            for row in results.rows
        ],
        "verdicts": [v.__dict__ for v in verdicts(results, ctx)],
        "verified_uploads": ctx.verified,
        "failures": ctx.failures,
    }


def summary(results: Results, ctx: Context, quick: bool) -> str:
    """The notes under the table: missing figures, client headroom, targets met or missed."""
    lines = []
    for target in results.targets:
        notes = {
            cell.note for row in results.rows if (cell := row.cells.get(target.key)) and cell.note
        }
        lines += [f"- {target.label}: {note}" for note in sorted(notes)]
    headrooms = [(row, h) for row in results.rows if (h := row.client_headroom()) is not None]
    if headrooms:
        low = min(headrooms, key=lambda item: item[1])
        lines.append(
            f"- client headroom: the client into the sink is at least {low[1]:.1f}x the fastest "
            f"server ({low[0].metric.label.strip()})"
        )
    caveat = " (quick run: sizes too small for the timings to mean anything)" if quick else ""
    lines.append(f"\nEarlier targets (before issue 16; its own are in the table above){caveat}:")
    for v in verdicts(results, ctx):
        lines.append(f"- [{'met' if v.met else 'MISSED'}] {v.target}: {v.goal} — {v.detail}")
    return "\n".join(lines)
