"""One file's upload over tus, resumable across dropped networks, Ctrl-C and restarts.

tuspy's `Uploader` builds the requests: the creation headers with the encoded metadata, the length
of each chunk, the offset bookkeeping, the client's headers (the bearer token). `FileUploader`
adds what a long-running command-line client needs and tuspy lacks: a timeout on every request
(tuspy sets none, so a network that drops silently would hang it), one keep-alive connection per
file, and a PATCH body read from the file as it goes out, so that the bars move within a chunk and
Ctrl-C stops in the middle of one.

`send_file` is the whole life of one file: its SHA-256, the upload resumed from the state file or
created (and recorded there before its first byte), PATCHes until the end (retrying through
dropped networks, waiting while the server says the upload is paused), then the server's digest
checked against ours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import mimetypes
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import requests
from tusclient.client import TusClient
from tusclient.uploader import Uploader

from ..protocol import tus
from .api import Server, ServerError, Unreachable
from .progress import FileBar, Progress
from .state import StateFile

BLOCK = 256 * 1024
RETRY_DELAYS = (1, 2, 4, 8, 15, 30)  # seconds; then every 30 s until `retry_for` runs out
PAUSE_POLL = 2.0  # seconds between status checks while the server holds the upload paused
COMPLETION_WAIT = 60.0  # seconds for the server to finish storing after the last PATCH

T = TypeVar("T")


class Stopped(Exception):
    """The run is being interrupted (Ctrl-C); the state file keeps what is needed to resume."""


@dataclass(frozen=True)
class Job:
    """A file to upload, as it was when the run started."""

    path: Path  # absolute
    label: str  # as the user named it (or its path under a folder they named)
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path, label: str) -> Job:
        stat = path.stat()
        return cls(path.resolve(), label, stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class Run:
    """What every file of one `upload` run shares."""

    server: Server
    chunk_size: int
    state: StateFile
    retry_for: float  # seconds without an answer from the server before a file is given up
    stop: threading.Event
    again: bool = False  # upload files the state file records as uploaded already


@dataclass(frozen=True)
class Outcome:
    job: Job
    ok: bool
    url: str | None = None
    message: str = ""
    unreachable: bool = False


class _Body:
    """A PATCH body read from the file as it is sent. requests streams an object that has
    `__iter__` and `read`, with the Content-Length taken from `__len__`."""

    def __init__(
        self, handle: BinaryIO, length: int, sent: Callable[[int], None], stop: threading.Event
    ) -> None:
        self.handle = handle
        self.remaining = length
        self.length = length
        self.sent = sent
        self.stop = stop

    def __len__(self) -> int:
        return self.length

    def read(self, size: int = -1) -> bytes:
        if self.stop.is_set():
            raise Stopped
        if size is None or size < 0:
            size = self.remaining
        data = self.handle.read(min(size, self.remaining, BLOCK))
        self.remaining -= len(data)
        if data:
            self.sent(len(data))
        return data

    def __iter__(self) -> Iterator[bytes]:
        while block := self.read(BLOCK):
            yield block


class FileUploader(Uploader):
    """tuspy's Uploader with timeouts, one connection, and a streamed, interruptible PATCH."""

    def __init__(
        self, job: Job, run: Run, metadata: dict[str, str], sent: Callable[[int], None]
    ) -> None:
        self.run = run
        self.http = requests.Session()
        self.sent = sent
        super().__init__(
            file_path=str(job.path),
            client=TusClient(run.server.endpoint, headers=run.server.headers()),
            chunk_size=run.chunk_size,
            metadata=metadata,
        )

    @property
    def upload_id(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[1]

    def _request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        return self.run.server.request(self.http, method, url, **kwargs)

    def get_offset(self) -> int:
        response = self._request("HEAD", self.url, headers=self.get_headers())
        if response.status_code != 200 or "Upload-Offset" not in response.headers:
            raise ServerError.from_response(response)
        return int(response.headers["Upload-Offset"])

    def create_url(self) -> str:
        response = self._request("POST", self.client.url, headers=self.get_url_creation_headers())
        if response.status_code != 201 or "Location" not in response.headers:
            raise ServerError.from_response(response)
        return urllib.parse.urljoin(self.client.url, response.headers["Location"])

    def send_chunk(self) -> None:
        """PATCH the next chunk from the current offset; the offset moves on when it is stored."""
        headers = {
            **self.get_headers(),
            "Upload-Offset": str(self.offset),
            "Content-Type": tus.OFFSET_OCTET_STREAM,
        }
        with open(self.file_path, "rb") as handle:
            handle.seek(self.offset)
            body = _Body(handle, self.get_request_length(), self.sent, self.run.stop)
            response = self._request("PATCH", self.url, data=body, headers=headers)
        if response.status_code != 204:
            raise ServerError.from_response(response)
        self.offset = int(response.headers["Upload-Offset"])

    def close(self) -> None:
        self.http.close()


class _Patience:
    """Waits between attempts while the server does not answer, and gives up (re-raising the
    error) once it has not answered for `retry_for` seconds. Any progress resets the clock."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.attempt = 0
        self.since: float | None = None

    def reset(self) -> None:
        self.attempt, self.since = 0, None

    def wait(self, error: Exception) -> None:
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        if now - self.since >= self.run.retry_for:
            raise error
        delay = RETRY_DELAYS[min(self.attempt, len(RETRY_DELAYS) - 1)]
        self.attempt += 1
        if self.run.stop.wait(delay):
            raise Stopped

    def call(self, request: Callable[[], T]) -> T:
        while True:
            try:
                return request()
            except Unreachable as exc:
                self.wait(exc)
            except ServerError as exc:
                if exc.status < 500:
                    raise
                self.wait(exc)


def send_file(job: Job, run: Run, progress: Progress) -> Outcome:
    """Upload one file; an `Outcome` for every end but Ctrl-C, which raises `Stopped`."""
    bar = progress.file(job.label, job.size)
    try:
        return _send(job, run, bar)
    except Unreachable as exc:
        return Outcome(job, False, message=str(exc), unreachable=True)
    except (ServerError, OSError) as exc:
        return Outcome(job, False, message=str(exc))
    finally:
        bar.close()


def _send(job: Job, run: Run, bar: FileBar) -> Outcome:
    key = StateFile.key(run.server.endpoint, job.path, job.size, job.mtime_ns)
    saved = run.state.get(key) or {}
    if saved.get("completed") and run.again:
        saved = {"sha256": saved.get("sha256")}
    digest = saved.get("sha256") or _sha256(job.path, run.stop, bar)
    metadata = {"filename": job.path.name, "sha256": digest}
    filetype = mimetypes.guess_type(job.path.name)[0]
    if filetype:
        metadata["filetype"] = filetype
    uploader = FileUploader(job, run, metadata, bar.sent)
    patience = _Patience(run)
    try:
        if saved.get("url"):
            uploader.set_url(saved["url"])
            try:
                uploader.offset = patience.call(uploader.get_offset)
            except ServerError as exc:
                if exc.status not in (404, 410):
                    raise
                uploader.url = None  # expired or terminated on the server: start again
        if uploader.url is None:
            uploader.set_url(patience.call(uploader.create_url))
            uploader.offset = 0
            saved = {"url": uploader.url, "path": str(job.path), "sha256": digest}
            run.state.put(key, saved)
        bar.sending_from(uploader.offset)
        while uploader.offset < job.size:
            try:
                uploader.send_chunk()
                patience.reset()
                continue
            except Unreachable as exc:
                patience.wait(exc)
            except ServerError as exc:
                if exc.code == "paused":
                    _wait_while_paused(uploader, run, bar, patience)
                elif exc.status >= 500 or exc.code in ("upload_locked", "offset_mismatch"):
                    patience.wait(exc)
                else:
                    if exc.code == "digest_mismatch":  # the file changed: a rerun starts afresh
                        run.state.remove(key)
                    raise
            uploader.offset = patience.call(uploader.get_offset)
            bar.sending_from(uploader.offset)
        outcome = _verify(job, uploader, digest, run, patience)
        if outcome.ok and saved.get("completed"):
            return dataclasses.replace(outcome, message=f"already uploaded, {outcome.message}")
        if outcome.ok:
            run.state.put(key, {**saved, "completed": True})  # skipped by later runs
        else:
            run.state.remove(key)  # a later run starts a new upload
        return outcome
    finally:
        uploader.close()


def _wait_while_paused(uploader: FileUploader, run: Run, bar: FileBar, patience: _Patience) -> None:
    """Someone paused this upload on the server (`upload-client pause`, the page): wait for a
    resume there, however long, as Ctrl-C still stops the run."""
    bar.waiting("paused on the server")
    while True:
        if run.stop.wait(PAUSE_POLL):
            raise Stopped
        status = patience.call(
            lambda: run.server.seed(uploader.http, "GET", "status", uploader.upload_id)
        )
        if not status["paused"]:
            return


def _verify(
    job: Job, uploader: FileUploader, digest: str, run: Run, patience: _Patience
) -> Outcome:
    """Wait for the server to finish storing, then compare its SHA-256 with ours. An upload the
    server has not finished storing yet stays resumable (its state entry is kept)."""
    deadline = time.monotonic() + COMPLETION_WAIT
    while True:
        status = patience.call(
            lambda: run.server.seed(uploader.http, "GET", "status", uploader.upload_id)
        )
        if status["state"] in ("completed", "failed") or time.monotonic() > deadline:
            break
        if run.stop.wait(0.2):
            raise Stopped
    url = uploader.url
    if status["state"] not in ("completed", "failed"):
        raise ServerError(503, "not_stored_yet", f"the server is still storing it ({url})")
    if status["state"] == "failed":
        error = status.get("error") or {}
        return Outcome(job, False, url, f"not stored: {error.get('message') or 'failed'}")
    if status.get("sha256") != digest:
        return Outcome(
            job, False, url, f"the server stored sha256 {status.get('sha256')}, not ours"
        )
    return Outcome(job, True, url, f"sha256 {digest[:16]}… verified")


def _sha256(path: Path, stop: threading.Event, bar: FileBar) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1024 * 1024):
            if stop.is_set():
                raise Stopped
            digest.update(block)
            bar.hashed(len(block))
    return digest.hexdigest()
