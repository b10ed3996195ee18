"""tus-js-client, unmodified and at its default settings, as a client of the benchmark.

`benchmarks/tus-js-client/` pins tus-js-client 4.3.1 (the version the interop tests use) and holds
`upload.mjs`, which uploads one file with it in node: the whole file in one PATCH (chunkSize
Infinity, the default), retrying through dropped connections. Installed with `npm ci` when its
node_modules is missing; `Skipped` when that cannot be done.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from targets import HERE, npm_ci

TUS_JS_DIR = HERE / "tus-js-client"


@dataclass(frozen=True)
class Outcome:
    url: str | None  # the upload's URL, when the client reported success
    seconds: float  # upload.start() to onSuccess or onError, as node measured it
    error: str | None  # why it did not complete


def install() -> None:
    npm_ci(TUS_JS_DIR, Path("tus-js-client"), "tus-js-client")


def upload(endpoint: str, path: Path, timeout: float) -> Outcome:
    """Upload the file at `path` to the tus `endpoint` in a node process of its own; a process
    still running after `timeout` seconds is killed (by subprocess, which started it) and the
    upload counts as not completed."""
    try:
        done = subprocess.run(
            ["node", "upload.mjs", endpoint, str(path)],
            cwd=TUS_JS_DIR,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return Outcome(None, timeout, f"not completed after {timeout:.0f}s")
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (done.stderr or done.stdout)[-500:]
        return Outcome(None, 0.0, f"node exited with {done.returncode}: {tail}")
    if done.returncode != 0 or "url" not in answer:
        return Outcome(None, answer.get("seconds", 0.0), str(answer.get("error", answer)))
    return Outcome(answer["url"], answer["seconds"], None)
