"""Seven adjustments to waitress: the classes a server's connections are made of.

`waitress_server` puts them into one server of ours (`upload-server`), or into waitress's own
server class process-wide (`waitress-serve`). Each connection's channel (`KeepingChannel`) carries
its server's `ServerPolicy` and hands it to its parser (`AdmittingParser`) and tasks.

1. JSON errors: waitress answers some requests itself (body too large, malformed HTTP, headers too
   large) before the app sees them; those answers get the app's `{"error": ...}` shape, plus the
   `Tus-Resumable` a tus client expects and the CORS header a browser needs to read them.
2. Keep-alive after 204: waitress 3.0 closes the connection after every response without a
   Content-Length, including 204 and 304, which by definition have no body (RFC 9112 section 6.3)
   and must not carry one. Every tus PATCH answers 204, so each would cost the client a new TCP (and
   TLS) connection. The task below keeps such connections open unless the client asked to close.
3. Request bodies past 512 KiB spill to temporary files in the spool directory, created so that they
   can be linked (`SpoolingBuffer`): a tus PATCH body then becomes its spool segment by a link,
   with no copy at all. A seed form's file starts at its file part (`body_buffers`, the bytes
   before it stay in memory), so that part becomes its spool by a link too (`seed_follow`).
4. A body that would eat into the free-space reserve is refused with 507 as soon as its headers
   arrive, before waitress reads (and spills to disk) a byte of it; no refusal, this one or a 413,
   is preceded by a `100 Continue` that would invite the body. A body that meets a full disk
   while it is buffered anyway (no reserve) is answered 507 `disk_full`, not reset.
5. A request whose connection closes, errors or times out in the middle of its body is not simply
   dropped: the channel hands its headers and the prefix that arrived (a `CutRequest`) to `on_cut`
   (see `cut_bodies`), which may keep it; the same observer hears when each body starts and ends.
   This runs on waitress's I/O thread, so the observer only decides and queues.
6. waitress's loop is `event_loop.LOOP` (a persistent selector that counts its passes), so a
   request thread can wait until the I/O thread has read every socket again (`LOOP.settle`): a
   client's retry that overtook its own cut connection then still finds the cut seen. For that
   (and for bursts of clients) a pass accepts every waiting connection, not one.
7. Connection limits and deadlines (`connection_limits`): a connection past `--max-connections`
   or its client's share is answered 503/429 at once; the loop's tick closes connections whose
   headers or bodies are too slow; a body spills to disk early once the bodies held in memory
   reach their budget. The loop is told of a socket's close before it happens (`del_channel` of
   our channels and refusals).
8. An IETF draft creation gets its `104 (Upload Resumption Supported)` before its body is read
   (`interim`): the parser is held (the channel stops reading) while a worker thread creates the
   upload, then the 104 is queued and reading resumes.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import waitress.adjustments
import waitress.buffers
import waitress.channel
import waitress.parser
import waitress.server
import waitress.task
import waitress.utilities
import waitress.wasyncore

from . import interim
from .body_buffers import BodySplitter, SpoolingBuffer
from .connection_limits import ADMISSION, Limits
from .errors import error_body
from .event_loop import LOOP
from .protocol import tus
from .received_body import received_prefix

log = logging.getLogger("upload_server.waitress")


class JsonError(waitress.utilities.Error):
    """An answer waitress gives itself, with the app's `{"error": ...}` body."""

    def to_response(self, ident: str | None = None):
        code = self.reason.lower().replace(" ", "_")
        body = error_body(code, f"{self.reason}: {self.body}")
        return f"{self.code} {self.reason}", [("Content-Type", "application/json")], body


def _as_json(error: waitress.utilities.Error) -> waitress.utilities.Error:
    """`error` (one of waitress's own: 400, 413, 431, 500, 501) answered with a JSON body."""
    if isinstance(error, JsonError | interim.AppAnswer):
        return error
    answer = JsonError(error.body)
    answer.code, answer.reason = error.code, error.reason
    return answer


class InsufficientStorage(JsonError):
    code = 507
    reason = "Insufficient Storage"


class DiskFull(InsufficientStorage):
    """A request body that could not be buffered because the upload disk is full."""

    def to_response(self, ident: str | None = None):
        body = error_body("disk_full", f"the server's disk is full ({self.body}); try again later")
        return f"{self.code} {self.reason}", [("Content-Type", "application/json")], body


class BufferFailed(JsonError):
    """A request body that could not be buffered for another reason (an I/O error)."""

    code = 500
    reason = "Internal Server Error"


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class StaleOffset(JsonError):
    """A tus PATCH that repeats a cut request whose prefix is kept: refused on its headers, so the
    client does not send a body that could only be refused once it had all arrived."""

    code = 409
    reason = "Conflict"

    def __init__(self, offset: int) -> None:
        super().__init__(f"the upload's offset is {offset}")
        self.offset = offset

    def to_response(self, ident: str | None = None):
        body = error_body(
            "offset_mismatch",
            f"Upload-Offset repeats a request whose connection was cut; the upload's offset is "
            f"{self.offset}",
            offset=self.offset,
        )
        headers = [("Content-Type", "application/json"), ("Upload-Offset", str(self.offset))]
        return f"{self.code} {self.reason}", headers, body


class BodyObserver(Protocol):
    """Told about request bodies as waitress receives them (see `cut_bodies.CutBodies`). Every
    call comes from waitress's I/O thread and must return at once."""

    def body_started(
        self, method: str, path: str, headers: dict[str, str], abort: Callable[[int | None], None]
    ) -> object | None:
        """A body begins; a key to report its end with, or None when it is of no interest.
        `abort(offset)` refuses the request at once (409, the upload's offset is `offset`);
        `abort(None)`, from any thread, cuts its connection (its prefix is then offered)."""

    def body_ended(self, key: object) -> None:
        """The body of `key` is complete or gone."""

    def stale_offset(self, method: str, path: str, headers: dict[str, str]) -> int | None:
        """The offset a request must start at instead, when its headers show that its body
        repeats bytes already kept (None: it may go on)."""

    def body_cut(self, cut: CutRequest) -> bool:
        """The connection ended mid-body: take the prefix (True) or let it be dropped."""


class _NoObserver:
    def body_started(
        self, method: str, path: str, headers: dict[str, str], abort: Callable[[int | None], None]
    ) -> object | None:
        return None

    def body_ended(self, key: object) -> None:
        pass

    def stale_offset(self, method: str, path: str, headers: dict[str, str]) -> int | None:
        return None

    def body_cut(self, cut: CutRequest) -> bool:
        return False


def _no_origin(origin: str) -> str | None:
    return None


def _admit_any(length: int) -> str | None:
    return None


@dataclass(frozen=True)
class ServerPolicy:
    """What one server's connections ask of the app, from waitress's I/O thread: `spool_dir`
    is where bodies past 512 KiB spill, as linkable files (None: waitress's own temporary files);
    `allow_origin` maps a request's Origin to its Access-Control-Allow-Origin (None: none);
    `admit` says why a body of that many bytes cannot be stored (None: it can); `observer`
    follows request bodies and is offered every one cut off mid-way; `limits` are the connection
    limits and deadlines; `splitter` says where a body that spills to a file starts its file
    (a seed form: at its file part, `seed_follow`)."""

    spool_dir: Path | None = None
    allow_origin: Callable[[str], str | None] = lambda origin: None
    admit: Callable[[int], str | None] = lambda length: None
    observer: BodyObserver = field(default_factory=_NoObserver)
    limits: Limits = field(default_factory=Limits)
    interim: interim.InterimResponses | None = None
    splitter: BodySplitter | None = None


class AdmittingParser(waitress.parser.HTTPRequestParser):
    """Asks `admit` about a declared Content-Length once the headers are parsed (a chunked body
    declares none; the app checks it once it has arrived), asks `observer` whether the body
    repeats bytes already kept, and tells it when a body starts and when it is complete or
    dropped."""

    policy = ServerPolicy()  # its channel's
    watch_key: object | None = None
    started = 0.0  # time.monotonic() of its first byte
    memory_reserved = 0  # bytes of the in-memory body budget it holds (see connection_limits)
    rate_mark: tuple[float, int] | None = None  # (when, body bytes then): the body rate's window
    channel: KeepingChannel | None = None  # set by the channel that creates it
    hold: interim.Hold | None = None  # its body waits for its upload's creation (a 104)
    created: str | None = None  # the upload its 104 announced
    quick = False  # a bodiless HEAD or GET, queued: body reads wait for it (`LOOP.quick_begun`)

    def parse_header(self, header_plus: bytes) -> None:
        default = self.adj.inbuf_overflow
        self.memory_reserved = ADMISSION.reserve_body_memory(default)
        if self.memory_reserved < default:  # memory is spoken for: this body spills early
            self.adj = copy.copy(self.adj)
            self.adj.inbuf_overflow = self.memory_reserved
            self.memory_reserved = 0
        super().parse_header(header_plus)
        spool_dir = self.policy.spool_dir
        if self.body_rcv is not None and spool_dir is not None:  # nothing of the body is in yet
            self.body_rcv.buf = self._buffer(spool_dir)
        if self.content_length > 0:
            refusal = self.policy.admit(self.content_length)
            if refusal:
                self.error = InsufficientStorage(refusal)
                self.completed = True
        if not self.completed and self.body_rcv is not None:
            try:
                self._observe()
                if not self.completed and self.channel is not None:
                    interim.offer(self, self.channel)
            except Exception:  # a request's headers must never break waitress's loop
                log.exception("the body observer failed on a request's headers")

    def _buffer(self, spool_dir: Path) -> SpoolingBuffer:
        splitter = self.policy.splitter
        if splitter is None:
            return SpoolingBuffer(self.adj.inbuf_overflow, spool_dir)
        return SpoolingBuffer(
            self.adj.inbuf_overflow,
            spool_dir,
            functools.partial(splitter.split_at, self.command, self.path, self.headers),
            functools.partial(splitter.spilled, self.headers),
        )

    def _observe(self) -> None:
        offset = self.policy.observer.stale_offset(self.command, self.path, self.headers)
        if offset is not None:
            self.error = StaleOffset(offset)
            self.completed = True
            return
        self.watch_key = self.policy.observer.body_started(
            self.command, self.path, self.headers, self._abort
        )

    def received(self, data: bytes) -> int:
        if self.hold is not None:  # the body waits for the upload's creation (`interim`)
            self.hold.stash.append(bytes(data))
            return len(data)
        try:
            consumed = super().received(data)
        except OSError as exc:  # the body buffer's file could not take the bytes: answer that
            consumed = self._buffer_failed(exc, len(data))
        if self.error is not None:
            self.expect_continue = False  # refused (507, 413, ...): the client must not send on
        if self.completed:
            self.end_watch()
            self.quick = LOOP.quick_begun(self)
        return consumed

    def _buffer_failed(self, exc: OSError, received: int) -> int:
        """waitress could not buffer the body (it spills to a file in the spool directory past
        512 KiB): with the disk full, 507 `disk_full`; another error, 500. The body is dropped,
        and so is the rest of it as it arrives, until the answer is sent and the connection
        closes (a reset with no answer is what the client would get otherwise)."""
        full = exc.errno in _DISK_FULL
        log.warning(
            "could not buffer a request body (%s %s): %s; answering %s",
            self.command,
            self.path,
            exc.strerror or exc,
            507 if full else 500,
        )
        self.error = DiskFull(str(exc.strerror or exc)) if full else BufferFailed(str(exc))
        self.completed = True
        receiver, self.body_rcv = self.body_rcv, None
        if receiver is not None:
            with contextlib.suppress(OSError, ValueError):
                receiver.getbuf().close()  # frees its disk space at once
        if self.channel is not None:
            self.channel.discarding = True
        return received

    def _abort(self, offset: int | None) -> None:
        channel = self.channel
        if channel is not None and offset is None:  # on the I/O thread, as any close
            cut = lambda: channel.request is self and channel.handle_close()  # noqa: E731
            channel.server.trigger.pull_trigger(cut)
        elif channel is not None:
            channel.abort(self, StaleOffset(offset))

    def end_watch(self) -> None:
        key, self.watch_key = self.watch_key, None
        if key is not None:
            self.policy.observer.body_ended(key)

    def close(self) -> None:
        self.end_watch()
        reserved, self.memory_reserved = self.memory_reserved, 0
        ADMISSION.release_body_memory(reserved)
        super().close()


class JsonErrorTask(waitress.task.ErrorTask):
    """waitress's own error answer, in JSON (a problem for an IETF draft request, `interim`)
    and with the headers the app would have added."""

    def execute(self) -> None:
        self.request.error = _as_json(self.request.error)
        if self.channel.policy.interim is not None:
            self.request.error = self.channel.policy.interim.as_problem(self.request)
        headers = self.request.headers
        if "TUS_RESUMABLE" in headers:
            self.response_headers.append(("Tus-Resumable", tus.VERSION))
        allowed = self.channel.policy.allow_origin(headers.get("ORIGIN", ""))
        if allowed:
            self.response_headers.append(("Access-Control-Allow-Origin", allowed))
        super().execute()


class KeepAliveTask(waitress.task.WSGITask):
    """A WSGI task that does not close an HTTP/1.1 connection because a response has no body."""

    _bodiless_keep_alive = False

    def service(self) -> None:
        try:
            super().service()
        finally:
            LOOP.quick_done(self.request)

    def get_environment(self) -> dict[str, Any]:
        environ = super().get_environment()
        created = getattr(self.request, "created", None)
        if created:
            environ[interim.CREATED] = created
        return environ

    def build_response_header(self) -> bytes:
        wants_close = self.request.headers.get("CONNECTION", "").lower() == "close"
        self._bodiless_keep_alive = self.version == "1.1" and not wants_close and not self.has_body
        try:
            return super().build_response_header()
        finally:
            self._bodiless_keep_alive = False

    def set_close_on_finish(self) -> None:
        if not self._bodiless_keep_alive:
            super().set_close_on_finish()


@dataclass(frozen=True)
class CutRequest:
    """A request whose body stopped early: its WSGI environ, with `wsgi.input` holding the
    `length` bytes that arrived (and CONTENT_LENGTH saying so). `release` frees waitress's buffer
    behind it: whoever takes a CutRequest calls it exactly once, when done with the body."""

    environ: dict[str, Any]
    length: int
    declared: int  # the Content-Length the client announced (0 for a chunked body)
    reason: str  # "disconnected" or "timeout"
    release: Callable[[], None]


class KeepingChannel(waitress.channel.HTTPChannel):
    """A channel that offers a request cut off mid-body to `on_cut` before dropping it.

    Every way a channel ends (the peer closed, a socket error, the idle timeout of
    `maintenance`) goes through `handle_close`, where waitress would let the incomplete parser and
    the body buffer in it go. The parser's observer answers at once whether it takes the request."""

    policy = ServerPolicy()  # see `channel_for`
    task_class = KeepAliveTask
    error_task_class = JsonErrorTask
    discarding = False  # a request was refused mid-body: what else arrives is dropped

    had_request = False  # its first request began (the header deadline then counts from it)
    cut_reason: str | None = None  # set when the server closes it for being too slow

    def __init__(self, server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> None:
        self.opened_at = time.monotonic()
        self.addr = addr  # known before `add_channel` counts it against its client's cap
        super().__init__(server, sock, addr, adj, map=map)
        self.parser_class = self._new_parser

    def add_channel(self, map: Any = None) -> None:
        super().add_channel(map)
        ADMISSION.opened(self)

    def del_channel(self, map: Any = None) -> None:
        LOOP.closing(self._fileno, self)  # while its socket is still open
        super().del_channel(map)
        ADMISSION.closed(self)

    def _new_parser(self, adj: Any) -> AdmittingParser:
        parser = AdmittingParser(adj)  # made when a request's first byte arrives
        parser.channel = self
        parser.policy = self.policy
        parser.started = time.monotonic()
        self.had_request = True
        return parser

    def received(self, data: bytes) -> bool:
        if self.discarding:
            return False
        return super().received(data)

    def readable(self) -> bool:
        request = self.request
        return super().readable() and (request is None or request.hold is None)

    def refuse_with(self, request: AdmittingParser, answer: interim.Answer) -> None:
        """Answer a held request with the app's refusal of its creation (`interim`)."""
        self.abort(request, interim.AppAnswer(answer))

    def abort(self, request: AdmittingParser, error: waitress.utilities.Error) -> None:
        """Refuse `request`, still receiving its body, with `error` now (on the I/O thread): its
        answer is sent, the rest of its body is dropped, and the connection closes."""
        with self.requests_lock:
            if self.request is not request:
                return
            request.error = error
            request.completed = True
            request.end_watch()
            self.request = None
            self.discarding = True
            self.requests.append(request)
            if len(self.requests) == 1:
                self.server.add_task(self)

    def handle_close(self) -> None:
        request, self.request = self.request, None
        if request is not None:
            self._offer(request)
        super().handle_close()

    def _offer(self, request: AdmittingParser) -> None:
        taken = False
        try:
            cut = self._cut_request(request)
            taken = cut is not None and self.policy.observer.body_cut(cut)
        except Exception:  # never let this break waitress's loop
            log.exception("could not offer a cut request body")
        if taken:
            request.end_watch()  # the observer now tracks the prefix it took
        else:
            request.close()

    def _cut_request(self, request: AdmittingParser) -> CutRequest | None:
        receiver = request.body_rcv
        if request.completed or not request.headers_finished or request.error is not None:
            return None
        if receiver is None or not len(receiver):
            return None
        stream, length = received_prefix(receiver.getbuf())
        environ = self.task_class(self, request).get_environment()
        environ["wsgi.input"] = stream
        environ["CONTENT_LENGTH"] = str(length)
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        idle = time.time() - self.last_activity
        reason = self.cut_reason or (
            "timeout" if idle >= self.adj.channel_timeout else "disconnected"
        )
        return CutRequest(environ, length, request.content_length, reason, request.close)
