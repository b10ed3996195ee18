"""The IETF draft's `104 (Upload Resumption Supported)`, sent as soon as a creation's headers are in.

A client whose connection drops mid-body can resume only if it has learnt the upload's URL, so the
draft asks for an interim `104` with `Location` before the body. WSGI cannot send one, so it
happens in the waitress adjustments, without ever blocking waitress's single I/O thread:

1. on the I/O thread, when a request's headers are parsed (`AdmittingParser.parse_header`), `offer`
   asks `InterimResponses.wants`: a draft creation with a body, of an interop version this server
   speaks (a missing or unknown one gets no 104, as the draft says), with no earlier request of the
   connection still to be answered (the 104 must not overtake its answer). If so the parser is
   *held*: the channel stops reading the connection (`readable()` is false), and body bytes that
   came with the headers are set aside;
2. a worker thread runs the app's creation for that request with no content (`RESERVE`): auth,
   limits, the pre-create hook and the record all run there, as for any request;
3. its answer comes back to the I/O thread through the loop's trigger (`resume`): on success the
   `104` (and a `100 Continue` the client asked for) is queued on the channel's output under its
   lock, the parser remembers the upload (`created`), the bytes set aside are fed to it and
   reading resumes; a refusal is the request's answer, before its body is read;
4. the complete request then reaches the app with `CREATED` in its environ (so does the prefix of
   a cut one, `cut_bodies`), and the app appends its content to that upload instead of creating
   another.
"""

from __future__ import annotations

import io
import json
import logging
import urllib.parse
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import waitress.utilities

from .protocol import draft

log = logging.getLogger("upload_server.interim")

RESERVE = "upload_server.draft.reserve"  # creation at headers time: the Content-Length to come
CREATED = "upload_server.draft.created"  # the upload the 104 announced for this request
WORKERS = 4

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Answer = tuple[str, list[tuple[str, str]], bytes]  # status line, headers, body


@dataclass
class Hold:
    """A request whose body waits while its upload is created."""

    version: int
    stash: list[bytes] = field(default_factory=list)
    expect_continue: bool = False


class InterimResponses:
    """Decides on the I/O thread, creates on a worker thread (`app` is set by `build_app`)."""

    def __init__(self, tus_path: str, workers: int = WORKERS) -> None:
        self.tus_path = tus_path
        self.app: WsgiApp | None = None
        self.limit: str | None = None  # the server's Upload-Limit, for waitress's own 413s
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="interim")

    def wants(self, method: str, path: str, headers: dict[str, str]) -> int | None:
        """The interop version of a draft creation that gets a 104 (waitress's header names)."""
        if self.app is None or method not in ("POST", "PUT", "PATCH"):
            return None
        if urllib.parse.unquote(path) not in (self.tus_path, self.tus_path.rstrip("/")):
            return None
        if not draft.speaks_draft(lambda name: headers.get(name.upper().replace("-", "_"))):
            return None
        version = headers.get("UPLOAD_DRAFT_INTEROP_VERSION", "").strip()
        return int(version) if version.isdigit() and int(version) in draft.DIALECTS else None

    def reserve(self, environ: dict[str, Any], done: Callable[[Answer], None]) -> bool:
        """Create the upload of `environ`'s request off the I/O thread; `done` gets the answer."""
        try:
            self._executor.submit(self._run, environ, done)
        except RuntimeError:  # shut down
            return False
        return True

    def _run(self, environ: dict[str, Any], done: Callable[[Answer], None]) -> None:
        answer: Answer = ("500 Internal Server Error", [], b"")
        try:
            answer = _call(self.app, environ)
        except Exception:
            log.exception("creating a draft upload for its 104 failed")
        done(answer)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def as_problem(self, request: Any) -> Any:
        """waitress's own answer to a draft request (a body past the size limit, a malformed
        request, a full disk) as the RFC 9457 problem its client expects, with `Upload-Limit` on
        a 413; any other request's error as it is."""
        error = request.error
        header = request.headers.get
        if isinstance(error, AppAnswer) or not draft.speaks_draft(
            lambda name: header(name.upper().replace("-", "_"))
        ):
            return error
        status, headers, body = error.to_response()
        try:
            detail = json.loads(body)["error"]
            code, message = detail["code"], detail["message"]
        except (ValueError, KeyError, TypeError):
            code, message = "error", status
        number = int(status.split(" ", 1)[0])
        problem = {"type": "about:blank", "title": status.split(" ", 1)[1], "status": number}
        problem.update(detail=message, code=code)
        fields = [(k, v) for k, v in headers if k.lower() != "content-type"]
        fields += [("Content-Type", draft.PROBLEM_JSON), ("Upload-Complete", "?0")]
        if number == 413 and self.limit:
            fields.append(("Upload-Limit", self.limit))
        return AppAnswer((status, fields, json.dumps(problem).encode()))


def _call(app: WsgiApp | None, environ: dict[str, Any]) -> Answer:
    assert app is not None
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None):
        seen["status"], seen["headers"] = status, headers
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return seen.get("status", "500 Internal Server Error"), seen.get("headers", []), body


class AppAnswer(waitress.utilities.Error):
    """The app's own answer (status line, headers, body), sent by the channel as its error."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer[0])
        self.answer = answer

    def to_response(self, ident: str | None = None) -> Answer:
        status, headers, body = self.answer
        kept = [(k, v) for k, v in headers if k.lower() not in ("content-length", "connection")]
        return status, kept, body


# -- the channel's side (waitress's objects, on the I/O thread) ----------------------------------


def offer(parser: Any, channel: Any) -> None:
    """After a request's headers: hold it and create its upload if it gets a 104."""
    interim: InterimResponses | None = parser.policy.interim
    if interim is None or channel.requests:
        return
    version = interim.wants(parser.command, parser.path, parser.headers)
    if version is None:
        return
    environ = dict(channel.task_class(channel, parser).get_environment())
    environ[RESERVE] = -1 if parser.chunked else parser.content_length  # -1: not yet known
    environ["CONTENT_LENGTH"] = "0"
    environ["wsgi.input"] = io.BytesIO(b"")
    hold = Hold(version, expect_continue=parser.expect_continue)
    parser.expect_continue = False  # a 100 Continue waits for the verdict too
    parser.hold = hold
    trigger = channel.server.trigger

    def done(answer: Answer) -> None:  # on the worker thread
        trigger.pull_trigger(lambda: resume(parser, channel, answer))

    if not interim.reserve(environ, done):
        parser.hold = None
        parser.expect_continue = hold.expect_continue


def resume(parser: Any, channel: Any, answer: Answer) -> None:
    """On the I/O thread: send the 104 and go on reading, or refuse the request."""
    hold: Hold | None = parser.hold
    if hold is None or channel.request is not parser or not channel.connected:
        parser.hold = None
        return
    status, headers, _ = answer
    fields = {name.lower(): value for name, value in headers}
    if not status.startswith("2") or "location" not in fields:
        parser.hold = None
        channel.refuse_with(parser, answer)
        return
    parser.created = fields["location"].rsplit("/", 1)[-1]
    # from now on its body is one of that upload's (a new request of it ends this one, `cut_bodies`)
    headers = {**parser.headers, CREATED: parser.created}
    parser.watch_key = parser.policy.observer.body_started(
        parser.command, parser.path, headers, parser._abort
    )
    lines = [
        "HTTP/1.1 104 Upload Resumption Supported",
        f"Location: {fields['location']}",
        f"{draft.VERSION_HEADER}: {hold.version}",
    ]
    if "upload-limit" in fields:
        lines.append(f"Upload-Limit: {fields['upload-limit']}")
    interim = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if hold.expect_continue:
        interim = b"HTTP/1.1 100 Continue\r\n\r\n" + interim
        channel.sent_continue = True
    with channel.outbuf_lock:
        channel.outbufs[-1].append(interim)
        channel.current_outbuf_count += len(interim)
        channel.total_outbufs_len += len(interim)
    parser.hold = None
    stash, hold.stash = b"".join(hold.stash), []
    if stash:
        channel.received(stash)
