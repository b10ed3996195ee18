"""One writer per upload across nodes: a lease per upload in Redis.

`us:lock:<id>` holds `<node id>|<token>` and expires after `lease_ttl` unless the holder's node
renews it (its heartbeat thread does, for every lease it holds). A request on another node asks for
the lease with one atomic Lua script: it gets it when nobody holds it, or when the holder's node has
no heartbeat (`us:node:<node id>` expired: that node is gone), so a client resuming after a crash
waits for the heartbeat to lapse (seconds), not for the lease (`lease_ttl`). A lease held by a live
node is refused at once with 423, which tus clients retry; waitress hands a request to the app only
when its body is whole, so a connection that died mid-body never holds a lease.

Leases are not the only guard: the writer re-reads the shared record before it appends and refuses
an offset that does not match it, so a request that reaches a node after another node committed is
refused. The case no guard here closes: a node cut off from Redis (not from S3) for longer than the
heartbeat's TTL while it is in the middle of a PATCH finishes that PATCH's S3 commit while another
node may already have taken the upload over; S3 has no compare-and-set on multipart parts that could
fence it off.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .. import errors
from ..locks import UploadLocks
from ..sessions.redis_store import unavailable_on_error

log = logging.getLogger("upload_server.cluster")

LOCK_PREFIX = "us:lock:"
NODE_PREFIX = "us:node:"
POLL = 0.05
T = TypeVar("T")

# KEYS[1] lock; ARGV: value, ttl ms, node key prefix, this node's id
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder then
  local node = string.match(holder, '^(.*)|')
  if node ~= ARGV[4] and node and redis.call('EXISTS', ARGV[3] .. node) == 1 then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS[1] lock; ARGV: value
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] lock; ARGV: value, ttl ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class LeaseLocks:
    """The cluster's `locks.Locks`: this process's lock first (cheap, and it orders requests of
    one node), then the upload's lease in Redis. Same protocol as `UploadLocks`, so the tus
    resources do not know which one they hold."""

    def __init__(self, client: Any, node_id: str, ttl: float) -> None:
        self.client = client
        self.node_id = node_id
        self.ttl_ms = int(ttl * 1000)
        self.local = UploadLocks()
        self._held: dict[str, str] = {}  # upload id -> lease value, leases this node holds
        self._guard = threading.Lock()
        self._mine = threading.local()  # upload ids the current thread holds
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)

    @contextlib.contextmanager
    def hold(self, upload_id: str, wait: float = 0.0) -> Iterator[None]:
        """Hold the upload for one request, or raise Locked (423) after `wait` seconds."""
        deadline = time.monotonic() + wait
        with self.local.hold(upload_id, wait):
            value = f"{self.node_id}|{secrets.token_hex(8)}"
            while not self._try(upload_id, value):
                if time.monotonic() >= deadline:
                    raise errors.Locked(
                        "another request is writing to this upload; retry when it has finished",
                        code="upload_locked",
                    )
                time.sleep(POLL)
            with self._guard:
                self._held[upload_id] = value
            mine = self._thread_holds()
            mine.add(upload_id)
            try:
                yield
            finally:
                mine.discard(upload_id)
                with self._guard:
                    self._held.pop(upload_id, None)
                with contextlib.suppress(errors.UploadError), unavailable_on_error():
                    self._release(keys=[LOCK_PREFIX + upload_id], args=[value])

    def run_held(self, upload_id: str, action: Callable[[], T], wait: float) -> T:
        """Run `action` while this node holds the upload: at once if a request of this node holds
        it already (its writer orders the two), else under a lease of its own."""
        if upload_id in self._thread_holds() or self.holder(upload_id) == self.node_id:
            return action()
        with self.hold(upload_id, wait):
            return action()

    def holder(self, upload_id: str) -> str | None:
        """The node holding the upload's lease, if any."""
        with unavailable_on_error():
            value = self.client.get(LOCK_PREFIX + upload_id)
        return value.decode().split("|", 1)[0] if value else None

    def renew(self) -> None:
        """Extend every lease this node holds (called by the heartbeat thread)."""
        with self._guard:
            held = list(self._held.items())
        for upload_id, value in held:
            renewed = self._renew(keys=[LOCK_PREFIX + upload_id], args=[value, self.ttl_ms])
            with self._guard:
                still_held = self._held.get(upload_id) == value
            if not renewed and still_held:
                log.error("lost the lease of upload %s while holding it", upload_id)

    def release_all(self) -> None:
        """On shutdown: let other nodes take this node's uploads at once."""
        with self._guard:
            held, self._held = list(self._held.items()), {}
        for upload_id, value in held:
            self._release(keys=[LOCK_PREFIX + upload_id], args=[value])

    def _try(self, upload_id: str, value: str) -> bool:
        args = [value, self.ttl_ms, NODE_PREFIX, self.node_id]
        with unavailable_on_error():
            return bool(self._acquire(keys=[LOCK_PREFIX + upload_id], args=args))

    def _thread_holds(self) -> set[str]:
        mine = getattr(self._mine, "ids", None)
        if mine is None:
            mine = self._mine.ids = set()
        return mine
