"""Session records in Redis, shared by every node of a cluster.

Each record is one JSON string at `us:session:<id>`, replaced whole by `SET`, so a reader on any node
sees the old or the new record, never a mix. In cluster mode this record is the truth across nodes:
the writer holding an upload saves it at the end of every tus PATCH, at every state change and at
least once a second while a seed upload drains.

The ids of unfinished records are also in the set `us:unfinished` (updated in the same transaction
as the record), so start-up reads those alone: one SMEMBERS and an MGET per 500, never a SCAN of
the history. A finished record is set to expire after twice `keep` (`--keep-finished`): Redis
removes it itself, and until then the whole record is its tombstone. A Redis written before the
index is indexed once, by one SCAN, the first time `unfinished` finds no index.

`durable` is Redis's business, not ours: a record is as durable as the server's persistence settings
make it (`appendonly yes` with `appendfsync everysec` loses at most a second on a power cut).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

from .. import errors
from . import lifecycle
from .record import Session, is_session_id

log = logging.getLogger("upload_server.store")

PREFIX = "us:session:"
UNFINISHED = "us:unfinished"
INDEXED = "us:unfinished:indexed"  # present once the index covers every record
_BATCH = 500


def connect(url: str) -> Any:
    """A Redis client for `url` (imported here: redis is the optional `cluster` extra)."""
    import redis

    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


@contextlib.contextmanager
def unavailable_on_error() -> Iterator[None]:
    """A Redis failure becomes a 503 for the client (retry), never a 500 with a traceback."""
    import redis

    try:
        yield
    except redis.RedisError as exc:
        raise errors.Unavailable(
            f"the session store (Redis) failed: {exc}",
            code="store_unavailable",
            headers={"Retry-After": "1"},
        ) from None


class RedisSessionStore:
    def __init__(self, client: Any, keep: float = 0.0) -> None:
        self.client = client
        self.keep = keep

    @staticmethod
    def _key(session_id: str) -> str:
        if not is_session_id(session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        return PREFIX + session_id

    def _ttl(self, session: Session) -> int | None:
        """Seconds a finished record is kept (retention, then as long again); None: for ever."""
        if self.keep > 0 and lifecycle.is_filed_as_finished(session):
            return max(1, int(2 * self.keep))
        return None

    def save(self, session: Session, *, durable: bool) -> None:
        data = json.dumps(session.to_dict(), separators=(",", ":"))
        with unavailable_on_error():
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self._key(session.id), data, ex=self._ttl(session))
            if lifecycle.is_filed_as_finished(session):
                pipe.srem(UNFINISHED, session.id)
            else:
                pipe.sadd(UNFINISHED, session.id)
            pipe.execute()

    def load(self, session_id: str) -> Session | None:
        if not is_session_id(session_id):
            return None
        with unavailable_on_error():
            raw = self.client.get(self._key(session_id))
        return _parse(session_id, raw)

    def delete(self, session_id: str) -> None:
        if is_session_id(session_id):
            with unavailable_on_error():
                pipe = self.client.pipeline(transaction=True)
                pipe.delete(self._key(session_id))
                pipe.srem(UNFINISHED, session_id)
                pipe.execute()

    def all(self) -> Iterator[Session]:
        with unavailable_on_error():
            keys = list(self.client.scan_iter(match=PREFIX + "*", count=_BATCH))
        for start in range(0, len(keys), _BATCH):
            yield from self._load_many(keys[start : start + _BATCH])

    def unfinished(self) -> Iterator[Session]:
        with unavailable_on_error():
            if not self.client.exists(INDEXED):
                self._index()
            ids = sorted(i.decode() for i in self.client.smembers(UNFINISHED))
        keys = [PREFIX.encode() + i.encode() for i in ids if is_session_id(i)]
        for start in range(0, len(keys), _BATCH):
            for session in self._load_many(keys[start : start + _BATCH]):
                if not lifecycle.is_filed_as_finished(session):
                    yield session

    def _index(self) -> None:
        """Index the records of a Redis written before the index: one SCAN, once."""
        for session in self.all():
            self.save(session, durable=True)
        self.client.set(INDEXED, "1")

    def finished_before(self, cutoff: float) -> Iterator[str]:
        """None: a finished record expires by itself (its TTL)."""
        return iter(())

    def _load_many(self, keys: list[bytes]) -> Iterator[Session]:
        with unavailable_on_error():
            values = self.client.mget(keys)
        for key, raw in zip(keys, values, strict=True):
            session = _parse(key.decode()[len(PREFIX) :], raw)
            if session is not None:
                yield session


def _parse(session_id: str, raw: bytes | None) -> Session | None:
    if raw is None:
        return None
    try:
        return Session.from_dict(json.loads(raw))
    except (ValueError, TypeError) as exc:
        log.warning("skipping unreadable session record %s in Redis: %s", session_id, exc)
        return None
