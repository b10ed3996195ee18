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

from . import errors, metrics
from .config import Config

log = logging.getLogger("upload_server.hooks")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
QUEUE_LIMIT = 10_000


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
        self.events = set(config.hook_events)
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
        if self.active:
            self._thread = threading.Thread(target=self._deliver_loop, name="hooks", daemon=True)
            self._thread.start()

    @property
    def active(self) -> bool:
        return bool(self.url or self.callback)

    def _wants(self, event: str) -> bool:
        return event in self.events and self.active

    @staticmethod
    def _body(event: str, upload: dict[str, Any]) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        return {"event": event, "id": uuid.uuid4().hex, "time": now, "upload": upload}

    # -- pre-create: synchronous ----------------------------------------------------------------

    def pre_create(self, upload: dict[str, Any]) -> None:
        """Ask the application whether this upload may be created; raise to refuse it."""
        if not self._wants("pre-create"):
            return
        payload = self._body("pre-create", upload)
        if self.callback is not None:
            try:
                self.callback("pre-create", payload)
            except HookRejected:
                self._count("pre-create", "rejected")
                raise
            except Exception:
                self._count("pre-create", "failed")
                log.exception("pre-create hook callable failed")
                raise errors.Unavailable(
                    "the upload could not be approved: its hook failed", code="hook_failed"
                ) from None
        if self.url:
            self._pre_create_webhook(payload)

    def _pre_create_webhook(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        try:
            status, answer = self._post("pre-create", body)
        except OSError as exc:
            self._count("pre-create", "failed")
            log.error("pre-create hook unreachable: %s", exc)
            raise errors.Unavailable(
                "the upload could not be approved: its hook receiver is unreachable",
                code="hook_unavailable",
            ) from None
        self._count("pre-create")
        if not 200 <= status < 300:
            self._count("pre-create", "rejected")
            raise HookRejected(_message_of(answer), status=status if 400 <= status < 600 else 403)

    # -- everything else: queued --------------------------------------------------------------

    def emit(self, event: str, upload: dict[str, Any]) -> None:
        """Queue an event for delivery (callable and webhook); never blocks on the receiver."""
        if not self._wants(event):
            return
        payload = self._body(event, upload)
        delivery = _Delivery(
            time.monotonic(),
            next(self._seq),
            event,
            json.dumps(payload).encode(),
            upload.get("sessionID"),
        )
        with self._cond:
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
            self._attempt(delivery)

    def _try(self, delivery: _Delivery) -> tuple[bool, str]:
        """One delivery attempt: (delivered, why not). The callable is called on the first only."""
        if delivery.attempt == 0 and self.callback is not None:
            try:
                self.callback(delivery.event, json.loads(delivery.body))
            except Exception:
                self._count(delivery.event, "failed")
                log.exception("hook callable failed on %s", delivery.event)
        if not self.url:
            return True, ""
        try:
            status, _ = self._post(delivery.event, delivery.body)
        except OSError as exc:
            return False, str(exc)
        return 200 <= status < 300, f"HTTP {status}"

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


def verify_signature(secret: str, body: bytes, header: str) -> bool:
    """For receivers: does `Upload-Server-Signature` match the body?"""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header or "")
