"""Telling the application behind the server what happens to uploads.

Events: `pre-create` (before a session exists; the application may reject it), `post-create`,
`progress` (at most once a second per session), `post-finish` and `post-terminate` (terminated or
expired). Each goes to a Python callable (for people who embed the app) and/or an HTTP webhook:

    POST <hook_url>
    Content-Type: application/json
    Upload-Server-Event: post-finish
    Upload-Server-Signature: sha256=<hex HMAC-SHA256 of the body with --hook-secret>

    {"event": "post-finish", "id": "<unique>", "time": "...Z", "upload": {<the status object>}}

`pre-create` is synchronous: a non-2xx answer (or a callable raising `HookRejected`) refuses the
upload with that status and message; an unreachable receiver refuses it with 503. Every other event
is queued and delivered by a background thread with a timeout and retries with exponential backoff,
so a slow or dead receiver never holds up an upload. Failures are logged and counted, never dropped
silently; progress events waiting for delivery are coalesced per session.

With `--hook-format tusd` the same events go out as tusd's HTTP hooks (`hooks_tusd`: the body, and
the answers obeyed), `progress` under tusd's name `post-receive`, plus two more synchronous ones:
`pre-finish` (in the request that completes a tus upload; its answer may shape that response, and
the upload's `post-finish` waits for it, as in tusd) and `pre-terminate` (in a client's
termination request; its answer may refuse it). A `post-receive` answer with `StopUpload` ends
the upload.
"""

from __future__ import annotations

import datetime
import hashlib
import heapq
import hmac
import importlib
import itertools
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import errors, hooks_tusd, metrics
from .config import Config
from .hooks_tusd import Answer, HookAnswered
from .sessions.record import APPENDED, Session
from .sessions.record import is_session_id as _is_session_id
from .status import status_of

log = logging.getLogger("upload_server.hooks")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
QUEUE_LIMIT = 10_000
TUSD_ONLY = frozenset({"pre-finish", "pre-terminate"})
TUSD_NAMES = {"progress": "post-receive"}
REMEMBERED = 10_000  # stopped uploads and early pre-finish releases remembered at most


class HookRejected(errors.UploadError):
    """Raised by a pre-create hook to refuse an upload; status and message reach the client."""

    status, code = 403, "rejected_by_hook"


@dataclass
class HookStats:
    delivered: int = 0
    failed: int = 0
    retried: int = 0
    dropped: int = 0
    rejected: int = 0
    by_event: dict[str, int] = field(default_factory=dict)


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    event: str = field(compare=False)
    body: bytes = field(compare=False)
    session_id: str | None = field(compare=False)
    attempt: int = field(default=0, compare=False)


def load_callable(spec: str) -> Callable[[str, dict[str, Any]], None] | None:
    """`package.module:function` from the --hook-callable setting."""
    if not spec:
        return None
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--hook-callable must look like package.module:function, not {spec!r}")
    return getattr(importlib.import_module(module_name), attribute)


class Hooks:
    def __init__(
        self, config: Config, callback: Callable[[str, dict[str, Any]], None] | None = None
    ) -> None:
        self.url = config.hook_url
        self.secret = config.hook_secret.encode()
        self.format = config.hook_format
        self.upload_dir = config.upload_dir
        self.events = {"progress" if e == "post-receive" else e for e in config.hook_events}
        if self.events & TUSD_ONLY and self.format != "tusd":
            raise ValueError(
                f"hook events {', '.join(sorted(self.events & TUSD_ONLY))} need --hook-format tusd"
            )
        self.timeout = config.hook_timeout
        self.retries = config.hook_retries
        self.callback = callback or load_callable(config.hook_callable)
        self.stats = HookStats()
        self._queue: list[_Delivery] = []
        self._pending_progress: dict[str, _Delivery] = {}
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        # tusd format: post-finish deliveries held until their pre-finish has been answered
        self._held: dict[str, _Delivery] = {}
        self._released: dict[str, float] = {}
        self.stopped: dict[str, dict[str, Any]] = {}  # upload id -> HTTPResponse of StopUpload
        self.on_stop: Callable[[str], None] | None = None  # the service ends a stopped upload
        if self.active:
            self._thread = threading.Thread(target=self._deliver_loop, name="hooks", daemon=True)
            self._thread.start()

    @property
    def active(self) -> bool:
        return bool(self.url or self.callback)

    def _wants(self, event: str) -> bool:
        return event in self.events and self.active

    @property
    def tusd(self) -> bool:
        return self.format == "tusd"

    @staticmethod
    def _body(event: str, upload: dict[str, Any]) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        return {"event": event, "id": uuid.uuid4().hex, "time": now, "upload": upload}

    def _encode(self, event: str, session: Session) -> bytes:
        """The body of `event` about `session`, in the configured format."""
        if self.tusd:
            info = hooks_tusd.file_info(session, self.upload_dir)
            return hooks_tusd.request_body(TUSD_NAMES.get(event, event), info)
        return json.dumps(self._body(event, status_of(session))).encode()

    # -- pre-create: synchronous ----------------------------------------------------------------

    def pre_create(self, upload: dict[str, Any]) -> Answer | None:
        """Ask the application whether this upload may be created; raise to refuse it. In the
        tusd format, the answer (whose ChangeFileInfo the caller applies)."""
        if not self._wants("pre-create"):
            return None
        if self.tusd:
            answer = self._ask("pre-create", hooks_tusd.new_file_info(upload))
            if answer.reject_upload:
                self._count("pre-create", "rejected")
                raise HookAnswered(
                    "upload_rejected",
                    "upload creation has been rejected by server",
                    400,
                    answer.http_response,
                )
            if answer.change_id is not None and not is_hook_id(answer.change_id):
                raise errors.UploadError(
                    f"the pre-create hook gave the upload id {answer.change_id[:80]!r}: an id "
                    "is 16-64 letters, digits, '-' or '_', starting with a letter or digit",
                    code="hook_bad_answer",
                    status=502,
                )
            hooks_tusd.current().changes.append(answer.http_response)
            return answer
        _, status, answer = self._sync("pre-create", self._body("pre-create", upload))
        if status is not None and not 200 <= status < 300:
            self._count("pre-create", "rejected")
            raise HookRejected(_message_of(answer), status=status if 400 <= status < 600 else 403)
        return None

    def _sync(self, event: str, payload: dict[str, Any]) -> tuple[Any, int | None, bytes]:
        """A synchronous event: what the callable returned, and the webhook's status (None
        without one) and answer. A callable that fails or a receiver out of reach fail the
        request (503), never with a 500; `HookRejected` from a callable passes through."""
        returned = None
        if self.callback is not None:
            try:
                returned = self.callback(event, payload)
            except HookRejected:
                self._count(event, "rejected")
                raise
            except Exception:
                self._count(event, "failed")
                log.exception("%s hook callable failed", event)
                raise errors.Unavailable(
                    f"the upload could not be approved: its {event} hook failed",
                    code="hook_failed",
                ) from None
        if not self.url:
            self._count(event)
            return returned, None, b""
        try:
            status, answer = self._post(event, json.dumps(payload).encode())
        except OSError as exc:
            self._count(event, "failed")
            log.error("%s hook unreachable: %s", event, exc)
            raise errors.Unavailable(
                f"the upload could not be approved: its {event} hook receiver is unreachable",
                code="hook_unavailable",
            ) from None
        self._count(event)
        return returned, status, answer

    def pre_finish(self, session: Session) -> None:
        """tusd format: the request completing a tus upload waits for this; the answer's
        HTTPResponse shapes that request's response. The upload's post-finish goes out after."""
        if not (self.tusd and self._wants("pre-finish")):
            return
        try:
            answer = self._ask("pre-finish", hooks_tusd.file_info(session, self.upload_dir))
            hooks_tusd.current().changes.append(answer.http_response)
        finally:
            if self._holds("post-finish", session):
                self.release(session.id)

    def pre_terminate(self, session: Session) -> None:
        """tusd format: a client's termination request asks first; RejectTermination refuses it.
        Not asked for expiry, nor when a request takes back an upload it has just created."""
        context = hooks_tusd.current()
        if not (self.tusd and self._wants("pre-terminate") and hooks_tusd.in_request()):
            return
        if session.id in context.created:
            return
        answer = self._ask("pre-terminate", hooks_tusd.file_info(session, self.upload_dir))
        if answer.reject_termination:
            self._count("pre-terminate", "rejected")
            raise HookAnswered(
                "termination_rejected",
                "upload termination has been rejected by server",
                400,
                answer.http_response,
            )
        context.changes.append(answer.http_response)

    def _ask(self, hook_type: str, upload: dict[str, Any]) -> Answer:
        """A synchronous tusd hook: the callable's answer (a dict, if it returns one), else the
        webhook's. Non-2xx or no JSON object is a failed hook (503/502, as tusd fails the
        request; never a 500)."""
        payload = json.loads(hooks_tusd.request_body(hook_type, upload))
        returned, status, raw = self._sync(hook_type, payload)
        if status is not None and not 200 <= status < 300:
            log.error("%s hook answered HTTP %d: %s", hook_type, status, raw[:200])
            raise errors.Unavailable(
                f"the {hook_type} hook receiver answered HTTP {status}", code="hook_failed"
            )
        if status is None:
            raw = json.dumps(returned if isinstance(returned, dict) else {}).encode()
        try:
            return Answer.parse(raw)
        except ValueError as exc:
            raise errors.UploadError(
                f"the {hook_type} hook's answer is not valid: {exc}",
                code="hook_bad_answer",
                status=502,
            ) from None

    def release(self, session_id: str) -> None:
        """The pre-finish of `session_id` is done: its post-finish may go (now, or when it comes)."""
        with self._cond:
            held = self._held.pop(session_id, None)
            if held is None:
                _remember(self._released, session_id, time.monotonic())
                return
            held.due = time.monotonic()
            heapq.heapify(self._queue)
            self._cond.notify()

    # -- everything else: queued --------------------------------------------------------------

    def emit(self, event: str, session: Session) -> None:
        """Queue an event for delivery (callable and webhook); never blocks on the receiver."""
        if not self._wants(event):
            return
        delivery = _Delivery(
            time.monotonic(), next(self._seq), event, self._encode(event, session), session.id
        )
        with self._cond:
            if self._holds(event, session) and self._released.pop(session.id, None) is None:
                delivery.due += self.timeout + 5  # at most: a pre-finish releases it sooner
                self._held[session.id] = delivery
            if event == "progress" and delivery.session_id in self._pending_progress:
                # a newer progress report replaces one not yet sent
                self._pending_progress[delivery.session_id].body = delivery.body
                return
            if len(self._queue) >= QUEUE_LIMIT:
                self._count(event, "dropped")
                log.error("hook queue full (%d); dropping a %s event", QUEUE_LIMIT, event)
                return
            if event == "progress":
                self._pending_progress[delivery.session_id] = delivery
            heapq.heappush(self._queue, delivery)
            self._cond.notify()

    def _deliver_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (
                    not self._queue or self._queue[0].due > time.monotonic()
                ):
                    wait = self._queue[0].due - time.monotonic() if self._queue else None
                    self._cond.wait(wait)
                if self._stopped:
                    return
                delivery = heapq.heappop(self._queue)
                if delivery.event == "progress":
                    self._pending_progress.pop(delivery.session_id, None)
                if delivery.session_id and self._held.get(delivery.session_id) is delivery:
                    del self._held[delivery.session_id]
            self._attempt(delivery)

    def _try(self, delivery: _Delivery) -> tuple[bool, str]:
        """One delivery attempt: (delivered, why not). The callable is called on the first only."""
        name = TUSD_NAMES.get(delivery.event, delivery.event) if self.tusd else delivery.event
        if delivery.attempt == 0 and self.callback is not None:
            try:
                returned = self.callback(name, json.loads(delivery.body))
                if isinstance(returned, dict):
                    self._obey(delivery, json.dumps(returned).encode())
            except Exception:
                self._count(delivery.event, "failed")
                log.exception("hook callable failed on %s", delivery.event)
        if not self.url:
            return True, ""
        try:
            status, answer = self._post(name, delivery.body)
        except OSError as exc:
            return False, str(exc)
        if 200 <= status < 300:
            self._obey(delivery, answer)
        return 200 <= status < 300, f"HTTP {status}"

    def _holds(self, event: str, session: Session) -> bool:
        """Is this a post-finish that waits for its pre-finish (tusd format, tus uploads)?"""
        return (
            event == "post-finish"
            and self.tusd
            and "pre-finish" in self.events
            and session.protocol in APPENDED  # tus and the IETF draft: both call pre_finish
        )

    def _obey(self, delivery: _Delivery, raw: bytes) -> None:
        """What a tusd answer to a queued event may ask: StopUpload, at post-receive."""
        if not (self.tusd and delivery.event == "progress" and delivery.session_id):
            return
        try:
            answer = Answer.parse(raw)
        except ValueError as exc:
            log.error("post-receive hook answer of %s ignored: %s", delivery.session_id, exc)
            return
        if answer.stop_upload and self.on_stop is not None:
            log.info("post-receive hook stops upload %s", delivery.session_id)
            _remember(self.stopped, delivery.session_id, answer.http_response)
            self.on_stop(delivery.session_id)

    def _attempt(self, delivery: _Delivery) -> None:
        ok, reason = self._try(delivery)
        if ok:
            self._count(delivery.event)
            return
        if delivery.attempt >= self.retries:
            self._count(delivery.event, "failed")
            log.error(
                "giving up on %s hook after %d attempts: %s",
                delivery.event,
                delivery.attempt + 1,
                reason,
            )
            return
        self._count(delivery.event, "retried")
        delivery.attempt += 1
        delivery.due = time.monotonic() + min(
            BACKOFF_MAX, BACKOFF_START * 2 ** (delivery.attempt - 1)
        )
        log.warning(
            "%s hook failed (%s); retry %d in %.1fs",
            delivery.event,
            reason,
            delivery.attempt,
            delivery.due - time.monotonic(),
        )
        with self._cond:
            heapq.heappush(self._queue, delivery)
            self._cond.notify()

    def _post(self, event: str, body: bytes) -> tuple[int, bytes]:
        signature = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Upload-Server-Event": event,
                "Upload-Server-Signature": f"sha256={signature}",
                "User-Agent": "upload_server-hooks",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read(64 * 1024)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(64 * 1024)

    def _count(self, event: str, outcome: str = "delivered") -> None:
        """Count a delivery outcome, here and in the metrics."""
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        if outcome == "delivered":
            self.stats.by_event[event] = self.stats.by_event.get(event, 0) + 1
        metrics.get().hook_deliveries.labels(event, outcome).inc()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def stop(self, grace: float = 5.0) -> None:
        """Stop delivering. Events still queued (waiting for a retry, say) get one last attempt
        within `grace` seconds; any left then are logged and counted as dropped, not lost quietly."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(self.timeout + 1)
        deadline = time.monotonic() + grace
        with self._cond:
            left = sorted(self._queue)
            self._queue.clear()
        for delivery in left:
            if time.monotonic() < deadline and self._try(delivery)[0]:
                self._count(delivery.event)
                continue
            self._count(delivery.event, "dropped")
            log.error(
                "shutting down: the %s hook of upload %s was not delivered",
                delivery.event,
                delivery.session_id,
            )


def _message_of(answer: bytes) -> str:
    """The receiver's reason: `{"message": ...}` (or `{"error": {"message"}}`), else its text."""
    text = answer.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500] or "the upload was refused by the application"
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])[:500]
        if "message" in data:
            return str(data["message"])[:500]
    return text[:500]


def is_hook_id(upload_id: str) -> bool:
    """An upload id a hook may choose: one of ours could be it (ASCII, and no option could)."""
    return upload_id.isascii() and _is_session_id(upload_id) and upload_id[0].isalnum()


def _remember(table: dict[str, Any], key: str, value: Any) -> None:
    """Keep at most REMEMBERED entries: the oldest go first."""
    table[key] = value
    while len(table) > REMEMBERED:
        del table[next(iter(table))]


def verify_signature(secret: str, body: bytes, header: str) -> bool:
    """For receivers: does `Upload-Server-Signature` match the body?"""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header or "")
