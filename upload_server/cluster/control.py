"""Pause, resume and terminate from any node: requests to the node holding an upload, over Redis
pub/sub.

Every node subscribes to `us:control:<node id>` (requests for it) and `us:reply:<node id>` (answers
to its own requests). A request is JSON `{"id", "session", "action", "args", "reply"}`; the holder
applies it with its local `SessionService` (its writer holds the upload's spool or data handle) in a small
thread pool, and publishes `{"id", "session"}` or `{"id", "error": {...}}` on the reply channel.
PUBLISH says how many subscribers got the request: none means the holder is gone, and the caller
applies the command itself (see `node.ClusterNode.route`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from .. import errors
from ..sessions.directory import Serve
from ..sessions.lifecycle import Refusal
from ..sessions.record import Session
from ..sessions.redis_store import unavailable_on_error

log = logging.getLogger("upload_server.cluster")

CONTROL = "us:control:"
REPLY = "us:reply:"
WORKERS = 8


class ControlBus:
    def __init__(self, client: Any, node_id: str) -> None:
        self.client = client
        self.node_id = node_id
        self.serve: Serve | None = None
        self._waiting: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="cluster-control")
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._thread = threading.Thread(target=self._listen, name="cluster-bus", daemon=True)

    def start(self, serve: Serve) -> None:
        """Listen, and answer the requests for this node with `serve`."""
        self.serve = serve
        self._pubsub.subscribe(CONTROL + self.node_id, REPLY + self.node_id)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self._pubsub.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def ask(
        self, node: str, session_id: str, action: str, args: dict[str, Any], timeout: float
    ) -> Session | None:
        """Have `node` apply `action`; its refusal is raised as the UploadError it raised there.
        None: no such node is listening (it is gone)."""
        request_id = uuid.uuid4().hex
        future: Future = Future()
        with self._lock:
            self._waiting[request_id] = future
        message = {
            "id": request_id,
            "session": session_id,
            "action": action,
            "args": args,
            "reply": REPLY + self.node_id,
        }
        try:
            with unavailable_on_error():
                receivers = self.client.publish(CONTROL + node, json.dumps(message))
            if not receivers:
                return None
            try:
                answer = future.result(timeout)
            except FutureTimeout:
                raise errors.Unavailable(
                    f"node {node}, which holds this upload, did not answer in time; try again",
                    code="node_unavailable",
                    headers={"Retry-After": "1"},
                ) from None
        finally:
            with self._lock:
                self._waiting.pop(request_id, None)
        if "refusal" in answer:
            refusal = answer["refusal"]
            raise Refusal(refusal["code"], refusal["message"], offset=refusal.get("offset"))
        if "error" in answer:
            error = answer["error"]
            raise errors.UploadError(
                error["message"],
                code=error["code"],
                status=error["status"],
                headers=error.get("headers") or {},
                **error.get("extra", {}),
            )
        return Session.from_dict(answer["session"])

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._pubsub.get_message(timeout=1.0)
            except Exception as exc:  # Redis restarted: redis-py resubscribes on the next call
                log.warning("control channel: %s", exc)
                self._stop.wait(1.0)
                continue
            if message is None:
                continue
            try:
                body = json.loads(message["data"])
            except (ValueError, TypeError):
                log.warning("ignoring a malformed control message")
                continue
            if message["channel"].decode() == REPLY + self.node_id:
                with self._lock:
                    future = self._waiting.get(body.get("id"))
                if future is not None and not future.done():
                    future.set_result(body)
            else:
                self._pool.submit(self._apply, body)

    def _apply(self, request: dict[str, Any]) -> None:
        answer: dict[str, Any] = {"id": request.get("id")}
        assert self.serve is not None
        try:
            session = self.serve(request["session"], request["action"], request["args"])
            answer["session"] = session.to_dict()
        except Refusal as exc:
            answer["refusal"] = {"code": exc.code, "message": exc.message, "offset": exc.offset}
        except errors.UploadError as exc:
            answer["error"] = {
                "status": exc.status,
                "code": exc.code,
                "message": exc.message,
                "headers": exc.headers,
                "extra": exc.extra,
            }
        except Exception:
            log.exception(
                "applying %s to %s for another node failed",
                request.get("action"),
                request.get("session"),
            )
            answer["error"] = {
                "status": 500,
                "code": "internal_error",
                "message": "the node holding this upload failed; see its log",
            }
        with contextlib.suppress(Exception):
            self.client.publish(request["reply"], json.dumps(answer))
