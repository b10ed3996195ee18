"""`upload-client`: the command line.

    upload-client upload FILE_OR_FOLDER... [--parallel N] [--chunk-size SIZE] [--state-file PATH]
    upload-client status|pause|resume|cancel ID_OR_URL [--json]
    upload-client download ID_OR_URL [-o PATH]

Every command takes `--server URL` (or UPLOAD_CLIENT_SERVER), `--token T` (or UPLOAD_CLIENT_TOKEN,
which keeps it out of `ps`) and `--tus-path`. The exit status is one of `EXIT_CODES`, so that a
script can tell "done", "try again later" and "look at this" apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import requests

from ..config_values import parse_size
from .api import Server, ServerError, Unreachable, resolve
from .download import download
from .progress import Progress
from .state import StateError, StateFile
from .transfer import Job, Outcome, Run, Stopped, send_file

OK, FAILED, USAGE, UNREACHABLE, INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = {
    OK: "everything done; every upload stored and its SHA-256 verified",
    FAILED: "the server refused or failed something (or a digest did not match)",
    USAGE: "usage error: a bad option, a missing file, an unusable state file, a local file "
    "that cannot be read or written",
    UNREACHABLE: "the server could not be reached (run the same command again later)",
    INTERRUPTED: "interrupted by Ctrl-C (run the same command again to resume)",
}
DEFAULT_SERVER = "http://127.0.0.1:8080"
DEFAULT_STATE = "~/.upload-client-state.json"
STOP_GRACE = 3.0  # seconds the workers get to stop cleanly after Ctrl-C


class UsageError(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits with USAGE (2) on a bad command line
    try:
        return args.run(args)
    except (UsageError, StateError, ValueError) as exc:
        return _fail(USAGE, str(exc))
    except Unreachable as exc:
        return _fail(UNREACHABLE, str(exc))
    except ServerError as exc:
        return _fail(FAILED, str(exc))
    except requests.RequestException as exc:  # an OSError too, but about the network
        return _fail(UNREACHABLE, str(exc))
    except OSError as exc:  # a local file: the server was never the problem
        where = f": {exc.filename}" if exc.filename else ""
        return _fail(USAGE, f"{exc.strerror or exc}{where}")
    except KeyboardInterrupt:
        return _fail(INTERRUPTED, "interrupted")


def _fail(code: int, message: str) -> int:
    print(f"upload-client: {message}", file=sys.stderr)
    return code


# -- upload ------------------------------------------------------------------------------------


def upload(args: argparse.Namespace) -> int:
    jobs = collect(args.paths)
    state = StateFile(Path(os.path.expanduser(args.state_file)))
    server = _server(args)
    server.probe(requests.Session())
    run = Run(server, args.chunk_size, state, args.retry_for, threading.Event(), args.again)
    progress = Progress(sum(job.size for job in jobs), len(jobs))
    outcomes: list[Outcome] = []
    workers = _start_workers(jobs, run, progress, outcomes, args.parallel)
    try:
        for worker in workers:
            while worker.is_alive():
                worker.join(0.2)
    except KeyboardInterrupt:
        run.stop.set()
        for worker in workers:
            worker.join(STOP_GRACE / len(workers))
        progress.close()
        return _fail(
            INTERRUPTED,
            f"interrupted; run the same command again to resume (upload URLs are in {state.path})",
        )
    progress.close()
    failed = [o for o in outcomes if not o.ok]
    print(f"{len(outcomes) - len(failed)} uploaded, {len(failed)} failed")
    if not failed:
        return OK
    return UNREACHABLE if all(o.unreachable for o in failed) else FAILED


def collect(paths: Sequence[str]) -> list[Job]:
    """Files named, and the files in folders named (recursively, symlinked folders skipped)."""
    jobs: list[Job] = []
    for name in paths:
        path = Path(name)
        if path.is_file():
            jobs.append(Job.of(path, name))
        elif path.is_dir():
            for folder, subfolders, files in os.walk(path):
                subfolders.sort()
                for file in sorted(files):
                    inner = Path(folder) / file
                    if inner.is_file():
                        jobs.append(Job.of(inner, str(inner)))
        else:
            raise UsageError(f"no such file or folder: {name}")
    unique = list({job.path: job for job in jobs}.values())
    if not unique:
        raise UsageError("nothing to upload: the folders named are empty")
    return unique


def _start_workers(
    jobs: list[Job], run: Run, progress: Progress, outcomes: list[Outcome], parallel: int
) -> list[threading.Thread]:
    """Daemon threads, so that a worker blocked on a slow server never holds up Ctrl-C."""
    queue = deque(jobs)
    lock = threading.Lock()

    def work() -> None:
        while not run.stop.is_set():
            with lock:
                if not queue:
                    return
                job = queue.popleft()
            try:
                outcome = send_file(job, run, progress)
            except Stopped:
                return
            with lock:
                outcomes.append(outcome)
            if outcome.ok:
                progress.say(f"uploaded  {job.label}  {outcome.url}  ({outcome.message})")
            else:
                where = f"  {outcome.url}" if outcome.url else ""
                progress.say(f"FAILED    {job.label}{where}: {outcome.message}")

    workers = [
        threading.Thread(target=work, name=f"upload-{n}", daemon=True)
        for n in range(min(parallel, len(jobs)))
    ]
    for worker in workers:
        worker.start()
    return workers


# -- one session ------------------------------------------------------------------------------


def session_command(method: str, action: str, verb: str):
    """status, pause, resume and cancel: one seed API call on the upload's session."""

    def command(args: argparse.Namespace) -> int:
        server, upload_id = resolve(args.target, _server(args))
        status = server.seed(requests.Session(), method, action, upload_id)
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            if verb:
                print(f"{verb} {upload_id}")
            print(describe(status))
        return OK

    return command


def describe(status: dict) -> str:
    written, total = status["bytesWritten"], status["totalBytes"]
    share = f" ({written / total:.0%})" if total else ""
    lines = [
        f"session   {status['sessionID']}",
        f"file      {status['filename']}",
        f"state     {status['state']}",
        f"stored    {human(written)} of {human(total) if total is not None else '?'}{share}",
    ]
    if status.get("sha256"):
        lines.append(f"sha256    {status['sha256']}")
    if status.get("error"):
        lines.append(f"error     {status['error']['code']}: {status['error']['message']}")
    return "\n".join(lines)


def fetch(args: argparse.Namespace) -> int:
    server, upload_id = resolve(args.target, _server(args))
    result = download(server, upload_id, Path(args.output) if args.output else None)
    how = f", resumed at {human(result.resumed_at)}" if result.resumed_at else ""
    check = ", sha256 verified" if result.verified else ""
    print(f"downloaded {result.path} ({human(result.size)}{how}{check})")
    return OK


# -- the command line -------------------------------------------------------------------------


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _server(args: argparse.Namespace) -> Server:
    base = args.server.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise UsageError(f"--server must be an http:// or https:// URL, not {args.server!r}")
    tus_path = "/" + args.tus_path.strip("/") + "/"
    return Server(base, tus_path, args.token or None)


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1:
        raise argparse.ArgumentTypeError("the chunk size must be at least 1 byte")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=os.environ.get("UPLOAD_CLIENT_SERVER", DEFAULT_SERVER),
        help=f"the server's base URL [env UPLOAD_CLIENT_SERVER; default {DEFAULT_SERVER}]",
    )
    common.add_argument(
        "--token",
        default=os.environ.get("UPLOAD_CLIENT_TOKEN"),
        help="sent as 'Authorization: Bearer TOKEN' [env UPLOAD_CLIENT_TOKEN]",
    )
    common.add_argument("--tus-path", default="/files/", help="the server's tus path [/files/]")

    parser = argparse.ArgumentParser(
        prog="upload-client",
        description="Upload files to an upload_server over tus, resumably; manage its uploads.",
        epilog="exit status: "
        + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    send = commands.add_parser(
        "upload", parents=[common], help="upload files and folders (resumes unfinished ones)"
    )
    send.add_argument("paths", nargs="+", metavar="FILE_OR_FOLDER")
    send.add_argument("--parallel", type=_positive, default=3, help="files sent at once [3]")
    send.add_argument(
        "--chunk-size", type=_size, default=8 * 1024**2, help="bytes per PATCH [8MiB]"
    )
    send.add_argument(
        "--state-file",
        default=os.environ.get("UPLOAD_CLIENT_STATE", DEFAULT_STATE),
        help=f"where unfinished uploads are remembered [env UPLOAD_CLIENT_STATE; {DEFAULT_STATE}]",
    )
    send.add_argument(
        "--retry-for",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="keep retrying a server that does not answer for this long [120]",
    )
    send.add_argument(
        "--again",
        action="store_true",
        help="upload files again that the state file records as uploaded (and unchanged)",
    )
    send.set_defaults(run=upload)

    for name, method, action, verb, text in (
        ("status", "GET", "status", "", "show an upload's progress and state"),
        ("pause", "GET", "pause", "paused", "pause an upload on the server"),
        ("resume", "POST", "resume", "resumed", "resume a paused upload"),
        ("cancel", "POST", "terminate", "cancelled", "cancel an upload and delete its data"),
    ):
        command = commands.add_parser(name, parents=[common], help=text)
        command.add_argument("target", metavar="ID_OR_URL")
        command.add_argument("--json", action="store_true", help="print the server's JSON")
        command.set_defaults(run=session_command(method, action, verb))

    get = commands.add_parser(
        "download", parents=[common], help="download a completed upload (continues a partial file)"
    )
    get.add_argument("target", metavar="ID_OR_URL")
    get.add_argument("-o", "--output", help="file or folder to write to [the upload's filename]")
    get.set_defaults(run=fetch)
    return parser


if __name__ == "__main__":
    sys.exit(main())
