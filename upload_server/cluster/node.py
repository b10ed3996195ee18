"""This server as one node of a cluster: its heartbeat, its leases, and where commands go.

Who owns what across nodes:
- the session record in Redis is the truth; the Manager dict stays each node's live view of the
  uploads its own writers work on;
- a tus upload belongs, for one request at a time, to the node holding its lease (`leases`);
- a seed upload belongs to the node that spooled it (`Session.node`): only that node has its bytes
  until they are in S3, so its pause, resume and terminate are sent there (`control`);
- a node is alive while `us:node:<node id>` exists: its heartbeat thread sets it with a short TTL
  (and renews its leases), so a node that dies lets go of everything within seconds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..sessions import record as states
from ..sessions.directory import Apply, Serve
from ..sessions.record import Session
from ..sessions.redis_store import unavailable_on_error
from .control import ControlBus
from .leases import NODE_PREFIX, LeaseLocks

log = logging.getLogger("upload_server.cluster")

HEARTBEAT_TTL = 5.0
HEARTBEAT_EVERY = 1.0
FORWARD_TIMEOUT = 120.0  # a pause waits for the holder's writer, which a rate limit can slow
TAKEOVER_WAIT = HEARTBEAT_TTL * 2  # long enough for a dead holder's heartbeat to lapse

T = TypeVar("T")


class ClusterNode:
    def __init__(self, client: Any, node_id: str, lease_ttl: float) -> None:
        self.client = client
        self.node_id = node_id
        self.locks = LeaseLocks(client, node_id, lease_ttl)
        self.bus = ControlBus(client, node_id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="cluster-heartbeat", daemon=True)

    def start(self, serve: Serve) -> ClusterNode:
        """Join: beat, and answer other nodes' commands for uploads held here with `serve`."""
        self._heartbeat()
        self.bus.start(serve)
        self._thread.start()
        log.info("cluster node %s joined", self.node_id)
        return self

    def stop(self) -> None:
        """Leave: stop beating, release leases and the heartbeat key so others take over now."""
        self._stop.set()
        self._thread.join(5)
        self.bus.stop()
        with contextlib.suppress(Exception):
            self.locks.release_all()
            self.client.delete(NODE_PREFIX + self.node_id)

    def alive(self, node_id: str) -> bool:
        if node_id == self.node_id:
            return True
        with unavailable_on_error():
            return bool(self.client.exists(NODE_PREFIX + node_id))

    def problems(self) -> list[str]:
        """For /readyz: this node cannot serve uploads without Redis."""
        try:
            self.client.ping()
        except Exception as exc:
            return [f"Redis is unreachable: {exc}"]
        return []

    def route(self, session: Session, action: str, args: dict[str, Any], here: Apply) -> Session:
        """Apply a command where the upload is held: a seed upload on the node with its spool, a
        tus upload on the node whose request holds its lease. With no live holder elsewhere the
        command is applied here, under this node's lease, so nothing else writes meanwhile."""
        seed = session.protocol == states.SEED
        holder = session.node if seed else self.locks.holder(session.id)
        if holder and holder != self.node_id and self.alive(holder):
            answer = self.bus.ask(holder, session.id, action, args, FORWARD_TIMEOUT)
            if answer is not None:
                return answer
            log.warning("node %s holds %s but does not listen; taking over", holder, session.id)
        return self.run_here(session.id, lambda: here(session, action, args))

    def run_here(self, upload_id: str, action: Callable[[], T]) -> T:
        """Run `action` on this node while it holds the upload (see `LeaseLocks.run_held`),
        waiting long enough for a dead holder's heartbeat to lapse."""
        return self.locks.run_held(upload_id, action, TAKEOVER_WAIT)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY):
            try:
                self._heartbeat()
                self.locks.renew()
            except Exception as exc:  # Redis away for a moment: try again next beat
                log.warning("cluster heartbeat failed: %s", exc)

    def _heartbeat(self) -> None:
        self.client.set(NODE_PREFIX + self.node_id, str(time.time()), px=int(HEARTBEAT_TTL * 1000))
