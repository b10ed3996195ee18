"""Keeping the bytes of a tus request whose connection was cut mid-body.

waitress hands the app only complete requests. Without this module a `PATCH` of 20 MiB cut after
15 MiB would leave the upload's offset where it was, and clients that send a whole file in one
request (tus-js-client and Uppy at their defaults) could never finish over a link that drops
every few megabytes.

The channel (`waitress_patches.KeepingChannel`) offers each request cut off mid-body to
`CutBodies.body_cut`, on waitress's single I/O thread. It decides from the headers alone, marks
the upload as having a prefix in flight and queues the work; a worker thread then runs the request
through the whole app as the complete request of the length that arrived: the same credentials,
locks, offset checks, spool segment, writer and record as any PATCH (or creation-with-upload POST),
so a kept prefix is stored exactly as a PATCH of that length would be. A request that carries
`Upload-Checksum` cannot be verified without all of its body, so its prefix is discarded, as the
tus checksum extension asks.

The IETF draft's creations and appends are kept the same way: an append (`PATCH` of an upload), and
a creation whose `104` announced its upload (`interim.CREATED`: a client that never learnt the
upload could not resume it). Since the draft's client must never send two bodies of one upload at
once, a new request of it while a body is still arriving means that body's connection is dead to
the client: the draft recommends ending it, so `wait` cuts it (its prefix is kept as above) rather
than leaving the client locked out until it times out.

A client that retries sees the kept bytes: a `HEAD` first lets waitress's I/O thread read what has
reached the host (a few loop passes, a retry may overtake its own cut connection), and a `HEAD` or
`PATCH` of that upload waits (bounded) while a PATCH body of it is still arriving or a cut prefix
of it is being stored, then answers from the new offset.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import metrics
from .interim import CREATED
from .protocol import draft, tus
from .waitress_patches import LOOP, CutRequest

log = logging.getLogger("upload_server.cut_bodies")

ENVIRON_KEY = "upload_server.cut"  # set in the environ of a request replayed from a cut one
PENDING_WAIT = 20.0  # longest a HEAD or PATCH waits for a cut prefix of its upload to be stored
IN_FLIGHT_WAIT = 2.0  # longest it waits for a PATCH body of its upload that is still arriving
SUPERSEDE_GRACE = 0.5  # a draft request: how long a body it supersedes may still end by itself
LOOP_PASSES = 3  # without poll(): accept a connection, read its last bytes, see it close
LOOP_WAIT = 0.1  # at most this long
WORKERS = 4
REPEAT_WINDOW = 60.0  # seconds a PATCH repeating a kept cut request is refused on its headers

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class CutBodies:
    def __init__(self, tus_path: str, workers: int = WORKERS) -> None:
        self.tus_path = tus_path
        self.app: WsgiApp | None = None
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="cut-body")
        self._guard = threading.Condition()
        self._pending: dict[str, int] = {}  # upload id -> cut prefixes being stored
        self._in_flight: dict[str, set[_InFlight]] = {}  # upload id -> PATCH bodies arriving
        self._kept: dict[str, _Kept] = {}  # upload id -> its last cut PATCH whose prefix is kept
        self._closed = False

    # -- on waitress's I/O thread: decide and queue, never block ---------------------------

    def body_started(
        self, method: str, path: str, headers: dict[str, str], abort: Callable[[int], None]
    ) -> object | None:
        """A tus PATCH body begins: until it is complete or cut, a HEAD of that upload may be
        a client's retry that has not yet seen its own bytes (see `wait`), and if a cut request
        of the same offset is kept meanwhile, this one is its repeat (`abort`)."""
        target = self._target(method, path, headers)
        if target is None or target[1] is None:
            return None
        request = (_offset_of(headers.get("UPLOAD_OFFSET", "")), headers.get("AUTHORIZATION"))
        key = _InFlight(target[1], request, abort)
        with self._guard:
            self._in_flight.setdefault(key.upload_id, set()).add(key)
        return key

    def body_ended(self, key: object) -> None:
        assert isinstance(key, _InFlight)
        with self._guard:
            bodies = self._in_flight.get(key.upload_id, set())
            bodies.discard(key)
            if not bodies:
                self._in_flight.pop(key.upload_id, None)
            self._guard.notify_all()

    def stale_offset(self, method: str, path: str, headers: dict[str, str]) -> int | None:
        """A PATCH that repeats the Upload-Offset of a cut request of the same upload whose
        prefix is kept (or being stored) would only get 409 after all of its body: browsers
        re-send a request cut on a reused connection by themselves. Refuse it on its headers,
        with the offset after the kept prefix."""
        target = self._target(method, path, headers)
        if target is None or target[1] is None or target[0] == "draft":
            return None  # a draft client takes a 409 as final: its repeat is refused as usual
        with self._guard:
            recent = self._kept.get(target[1])
        if recent is None or time.monotonic() - recent.since > REPEAT_WINDOW:
            return None
        same = (_offset_of(headers.get("UPLOAD_OFFSET", "")), headers.get("AUTHORIZATION"))
        return recent.offset + recent.length if same == recent.request else None

    def body_cut(self, cut: CutRequest) -> bool:
        """Take a cut request if its prefix can count; False lets waitress drop it."""
        environ = cut.environ
        headers = {"CONTENT_TYPE": environ.get("CONTENT_TYPE", "")}
        headers.update((k[5:], v) for k, v in environ.items() if k[5:] in _SIGNS)
        if environ.get(CREATED):
            headers[CREATED] = environ[CREATED]
        target = self._target(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), headers)
        if target is None or self.app is None:
            return False
        kind, upload_id = target
        if environ.get("HTTP_UPLOAD_CHECKSUM") or environ.get("HTTP_CONTENT_DIGEST"):
            metrics.get().cut_bytes.labels("discarded").inc(cut.length)
            log.info(
                "discarded %d bytes of a cut %s of upload %s (%s): it carries Upload-Checksum, "
                "(or Content-Digest), which cannot be verified on part of a body",
                cut.length,
                kind,
                upload_id or "(new)",
                cut.reason,
            )
            return False
        with self._guard:
            if self._closed:
                return False
            repeats: list[_InFlight] = []
            if upload_id and kind == "draft":
                _count(self._pending, upload_id, +1)
            elif upload_id:
                _count(self._pending, upload_id, +1)
                request = (_offset(environ), environ.get("HTTP_AUTHORIZATION"))
                if request[0] is not None:
                    kept = _Kept(request, cut.length, time.monotonic())
                    self._kept[upload_id] = kept
                    bodies = self._in_flight.get(upload_id, ())
                    repeats = [body for body in bodies if body.request == request]
        for repeat in repeats:  # re-sent before this cut was seen: it would only get 409
            repeat.abort(kept.offset + kept.length)
        try:
            self._executor.submit(self._keep, cut, kind, upload_id)
        except RuntimeError:  # shut down in between
            self._done(upload_id)
            return False
        return True

    def _target(
        self, method: str, path: str, headers: dict[str, str]
    ) -> tuple[str, str | None] | None:
        """("append", id) for a tus PATCH, ("creation", None) for a tus creation with a body,
        ("draft", id) for an IETF draft append, or creation whose 104 announced upload `id`,
        else None. The app checks everything else, as for any request."""
        method = headers.get("X_HTTP_METHOD_OVERRIDE", "").strip().upper() or method
        if draft.speaks_draft(lambda name: headers.get(name.upper().replace("-", "_"))):
            if path in (self.tus_path, self.tus_path.rstrip("/")):
                return ("draft", headers[CREATED]) if headers.get(CREATED) else None
            target = self._upload(method, path)
            return ("draft", target) if target else None
        content_type = headers.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if content_type != tus.OFFSET_OCTET_STREAM:
            return None
        if method == "POST" and path in (self.tus_path, self.tus_path.rstrip("/")):
            return "creation", None
        upload_id = self._upload(method, path)
        return ("append", upload_id) if upload_id else None

    def _upload(self, method: str, path: str) -> str | None:
        """The upload a PATCH appends to."""
        if method == "PATCH" and path.startswith(self.tus_path):
            upload_id = urllib.parse.unquote(path[len(self.tus_path) :])
            if upload_id and "/" not in upload_id:
                return upload_id
        return None

    # -- on a worker thread -----------------------------------------------------------------

    def _keep(self, cut: CutRequest, kind: str, upload_id: str | None) -> None:
        offset = cut.environ.get("HTTP_UPLOAD_OFFSET", "0")
        status, headers = "500 Internal Server Error", {}
        try:
            status, headers = self._replay(cut.environ)
        except Exception:
            log.exception("keeping a cut %s of upload %s failed", kind, upload_id or "(new)")
        finally:
            cut.release()
            if upload_id and status[:1] != "2":
                self._forget(upload_id, _offset(cut.environ))
            self._done(upload_id)
        upload_id = upload_id or headers.get("location", "").rsplit("/", 1)[-1] or "(none)"
        figures = metrics.get()
        if status[:1] == "2":
            figures.cut_bytes.labels("kept").inc(cut.length)
            log.info(
                "kept %d bytes of a cut %s of upload %s at offset %s (%s after %d of %d bytes); "
                "offset now %s",
                cut.length,
                kind,
                upload_id,
                offset,
                cut.reason,
                cut.length,
                cut.declared,
                headers.get("upload-offset", "?"),
            )
        else:
            figures.cut_bytes.labels("discarded").inc(cut.length)
            log.info(
                "discarded %d bytes of a cut %s of upload %s at offset %s (%s): %s",
                cut.length,
                kind,
                upload_id,
                offset,
                cut.reason,
                status,
            )

    def _replay(self, environ: dict[str, Any]) -> tuple[str, dict[str, str]]:
        """Run the request through the app; its answer goes nowhere but the log."""
        assert self.app is not None
        environ[ENVIRON_KEY] = True
        answer: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None):
            answer["status"] = status
            answer["headers"] = {name.lower(): value for name, value in headers}
            return lambda data: None

        body = self.app(environ, start_response)
        try:
            for _ in body:
                pass
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return answer.get("status", "500"), answer.get("headers", {})

    def _forget(self, upload_id: str, offset: int | None) -> None:
        """The prefix was not kept: a repeat of the request may go on after all."""
        with self._guard:
            recent = self._kept.get(upload_id)
            if recent is not None and recent.offset == offset:
                del self._kept[upload_id]

    def _done(self, upload_id: str | None) -> None:
        if not upload_id:
            return
        with self._guard:
            _count(self._pending, upload_id, -1)
            self._guard.notify_all()

    # -- for the resources --------------------------------------------------------------------

    def wait(self, upload_id: str, environ: dict[str, Any]) -> None:
        """Let a request see an upload's offset only once every cut prefix of it is stored (at
        most PENDING_WAIT), and once a body of it still arriving has ended (at most
        IN_FLIGHT_WAIT: a client retrying after a cut sends its HEAD while the server may still be
        reading the last bytes of the dead connection). A replayed request never waits."""
        if environ.get(ENVIRON_KEY):
            return
        is_draft = draft.speaks_draft(
            lambda name: environ.get("HTTP_" + name.upper().replace("-", "_"))
        )
        with self._guard:
            arriving = upload_id in self._in_flight
        if environ.get("REQUEST_METHOD") == "HEAD" or (is_draft and arriving):
            # a retry may overtake its own cut connection (sent on another keep-alive
            # connection): let waitress read what has reached this host first
            LOOP.catch_up(LOOP_WAIT, LOOP_PASSES, upload_id.encode())
        if is_draft and arriving:
            self._end_superseded(upload_id)
        now = time.monotonic()
        pending_until, in_flight_until = now + PENDING_WAIT, now + IN_FLIGHT_WAIT
        with self._guard:
            while True:
                if upload_id in self._pending:
                    left = pending_until - time.monotonic()
                elif upload_id in self._in_flight:
                    left = min(pending_until, in_flight_until) - time.monotonic()
                else:
                    return
                if left <= 0:
                    return
                self._guard.wait(left)

    def _end_superseded(self, upload_id: str) -> None:
        """A draft client sends a new request of an upload only once it has given up on the one
        still arriving: give that body a moment to end by itself (a closed connection is read to
        its end), then cut its connection, so that its prefix is kept and this request goes on."""
        deadline = time.monotonic() + SUPERSEDE_GRACE
        with self._guard:
            while upload_id in self._in_flight and (left := deadline - time.monotonic()) > 0:
                self._guard.wait(left)
            superseded = list(self._in_flight.get(upload_id, ()))
        for body in superseded:
            body.abort(None)

    def close(self) -> None:
        """Stop taking cut requests; those queued are dropped (their clients re-send)."""
        with self._guard:
            self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)


_SIGNS = frozenset(  # the headers (environ names) that tell a request's protocol
    {"X_HTTP_METHOD_OVERRIDE", "TUS_RESUMABLE", "UPLOAD_COMPLETE", "UPLOAD_INCOMPLETE"}
    | {"UPLOAD_DRAFT_INTEROP_VERSION"}
)


def _count(counts: dict[str, int], key: str, step: int) -> None:
    left = counts.get(key, 0) + step
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


# What makes a PATCH the repeat of another: the same Upload-Offset and the same credential (a
# browser's own re-send carries the very same headers; another client's request is not refused).
RequestKey = tuple[int | None, str | None]


@dataclass(eq=False)
class _InFlight:
    """A PATCH body being received (identity is the key)."""

    upload_id: str
    request: RequestKey
    abort: Callable[[int], None]


@dataclass(frozen=True)
class _Kept:
    """A cut PATCH whose prefix is kept or being stored."""

    request: RequestKey
    length: int
    since: float

    @property
    def offset(self) -> int:
        return self.request[0] or 0


def _offset_of(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def _offset(environ: dict[str, Any]) -> int | None:
    return _offset_of(environ.get("HTTP_UPLOAD_OFFSET", ""))
