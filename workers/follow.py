"""A seed form's file part, hashed by a writer while its body still arrives.

waitress hands the app a `POST /upload` only once its whole body is in. Such a body's file starts
at its first file part (the bytes before it stay in memory: `body_buffers.SplitFileBuffer`),
so that the front end can make the file the part's spool by a link. Once that file exists the
front end tells a writer about it (`Follow`); the writer opens it through `/proc/<pid>/fd/<n>`
and, as it grows, reads and hashes it up to the first CRLF and delimiter, which is
where the multipart parser ends the part too. When the request is complete the front end asks
where that is (`Locate`), so that its parser need not search the part again, and then claims the
digest for the new session (`Claim`): the session's drain has nothing left to hash
(`take_digest`). A claim for another length than was hashed, or for a body this writer does not
follow (it restarted), is refused; the drain then hashes the spool as before.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from upload_server import fileio

from .context import Context
from .messages import Claim, Follow, Locate

IDLE = 0.005  # seconds a follow waits before it looks again at a body that has not grown
GONE_CHECK = 0.5  # seconds between looks whether the front end still holds a hashed body
CLAIM_WAIT = 120.0  # seconds a hashed part waits for its request's claim
KEPT_DIGESTS = 64  # digests claimed but not yet taken by a drain, at most
MAX_READ = 8 * 1024 * 1024  # bytes read (and hashed) in one step, at most


@dataclass
class Received:
    """One followed file part: its running SHA-256, and its length once its end is seen."""

    sha256: Any = field(default_factory=hashlib.sha256)
    length: int | None = None
    locates: list[Locate] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)


def follow(ctx: Context, message: Follow) -> Generator[int, None, None]:
    """Hash the part as the body grows; then hand the digest to its claim, or drop it when the
    body is gone (its connection was cut, its request refused) or nobody claims it."""
    received = Received()
    ctx.received[message.key] = received
    try:
        if not (yield from _hash(ctx, received, message)):
            return
        for located in received.locates:
            ctx.outbox.reply(located.request_id, length=received.length)
        received.locates.clear()
        watch = _Watch(_source(message), message.key)
        deadline = time.monotonic() + CLAIM_WAIT
        while not received.claims and time.monotonic() < deadline:
            if ctx.received.get(message.key) is not received or watch.gone():
                return
            yield 0
        if received.claims:
            _hand_over(ctx, received, received.claims.pop(0))
    finally:
        if ctx.received.get(message.key) is received:
            del ctx.received[message.key]
        for unanswered in received.locates + received.claims:
            _refuse(ctx, unanswered)


def locate(ctx: Context, message: Locate) -> None:
    """A complete request asks where its followed part ends (see `Locate`)."""
    received = ctx.received.get(message.key)
    if received is None:
        _refuse(ctx, message)
    elif received.length is not None:
        ctx.outbox.reply(message.request_id, length=received.length)
    else:
        received.locates.append(message)


def claim(ctx: Context, message: Claim) -> None:
    """A complete request claims a followed part's digest (see the module's docstring)."""
    received = ctx.received.get(message.key)
    if received is None:
        _refuse(ctx, message)
    else:
        received.claims.append(message)


def take_digest(ctx: Context, session_id: str) -> Any | None:
    """The SHA-256 of a session's spool, computed while its body arrived, or None."""
    return ctx.spool_digests.pop(session_id, None)


def _hash(ctx: Context, received: Received, message: Follow) -> Generator[int, None, bool]:
    """Hash from the file's start up to the needle, or once claimed up to the claimed length
    (linking the file as the spool cuts it there, the needle with it); False if the body is
    gone first, or ends before either (a body asked about with `Locate` is complete)."""
    needle = message.needle
    buffer = bytearray(min(max(ctx.settings.chunk_size, len(needle)), MAX_READ))
    pos = 0
    with memoryview(buffer) as whole:
        while True:
            limit = received.claims[0].length if received.claims else None
            if limit is not None and pos >= limit:
                received.length = pos
                return pos == limit
            want = len(buffer) if limit is None else min(len(buffer), limit - pos)
            with whole[:want] as view:
                got = _read(ctx, message, view, pos)
            if got is None or (limit is not None and got < want):
                return False
            found = buffer.find(needle, 0, got)
            if found >= 0:
                length = found
            else:  # a needle may straddle the end of what was read: its start is read again
                length = got if limit is not None else max(0, got - len(needle) + 1)
                if not length:  # nothing new; a body asked about is complete: it has no needle
                    if received.locates:
                        return False
                    yield 0
                    continue
            with whole[:length] as view:
                received.sha256.update(view)
            pos += length
            if found >= 0:
                received.length = pos
                return True
            yield length


def _read(ctx: Context, message: Follow, view: memoryview, pos: int) -> int | None:
    """Read the body at `pos` into `view`: how many bytes, or None when the front end no longer
    holds it. The file is open only meanwhile, so that a body the front end drops frees its disk
    at once, and read with `pread`, not a map: a file cut under a map would kill this process
    (SIGBUS). With fsync on, the part's writeback starts too: it is to become the data, and the
    flush at completion then finds little left to write."""
    try:
        src = os.open(_source(message), os.O_RDONLY)
    except OSError:
        return None
    try:
        if _key(os.fstat(src)) != message.key:
            return None  # the front end closed that body, and the number was reused
        got = os.preadv(src, [view], pos)
        if got and ctx.settings.fsync != "never":
            fileio.start_writeback(src, pos, got)
        return got
    finally:
        os.close(src)


def _source(message: Follow) -> str:
    return f"/proc/{message.pid}/fd/{message.fd}"


class _Watch:
    """Whether the front end still holds a hashed body (its request not yet claimed it): its
    descriptor, looked at through /proc at most once every `GONE_CHECK`."""

    def __init__(self, source: str, key: tuple[int, int]) -> None:
        self.source = source
        self.key = key
        self.looked = time.monotonic()

    def gone(self) -> bool:
        now = time.monotonic()
        if now - self.looked < GONE_CHECK:
            return False
        self.looked = now
        try:
            return _key(os.stat(self.source)) != self.key
        except OSError:
            return True


def _hand_over(ctx: Context, received: Received, message: Claim) -> None:
    """Keep the digest for the session's drain, if it covers exactly the claimed part."""
    if received.length != message.length:
        _refuse(ctx, message)
        return
    digests = ctx.spool_digests
    digests[message.session_id] = received.sha256
    while len(digests) > KEPT_DIGESTS:
        digests.pop(next(iter(digests)))
    ctx.reply(message.request_id)


def _refuse(ctx: Context, message: Locate | Claim) -> None:
    ctx.outbox.reply(
        message.request_id, code="not_followed", message="the body was not hashed as it arrived"
    )


def _key(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino
