"""Seed drain: a session carried on by itself, with no request waiting.

A seed upload is copied from its spool into its data chunk by chunk from the durable offset. A seed
upload whose spool holds the whole file is only hashed, then renamed into the data: no second
write at all. A tus upload's drain copies the segments its record names (counted before a crash
or a pause). A spool that is gone or short makes the upload wait for its client to send the file
again.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

from upload_server import fileio, metrics
from upload_server.sessions import lifecycle
from upload_server.sessions import record as states
from upload_server.sessions.lifecycle import Refusal
from upload_server.storage import Adopting

from .append import apply_segments, settle
from .context import Context
from .finish import fail_write, finish
from .follow import take_digest
from .held import STATE, Held


def drain(ctx: Context, session_id: str) -> Generator[int, None, None]:
    """Carry a session on by itself: a seed upload from its spool, a tus upload's segments."""
    try:
        held = ctx.sessions.hold(session_id)
    except Refusal:
        return
    session = held.session
    if session.state not in (states.QUEUED, states.WRITING, states.FAILED, states.WAITING):
        return
    if session.protocol in states.APPENDED:  # segments counted before a crash or a pause
        held.data()
        if (yield from apply_segments(ctx, held)):
            settle(ctx, held, None)
        return
    digest = take_digest(ctx, session_id)
    spool = ctx.layout.spool(session_id)
    try:
        fd = fileio.open_for_read(spool)
    except FileNotFoundError:
        if session.total_bytes is not None and ctx.storage.size(session_id) == session.total_bytes:
            # the whole spool was renamed into the data just before a crash: finish from it
            _unspool(held, session.total_bytes)
            finish(ctx, held)
            return
        _spool_missing(held)
        return
    try:
        lifecycle.start_writing(session)
        if isinstance(ctx.storage, Adopting) and (
            session.spooled or (session.bytes_written == 0 and not ctx.storage.size(session_id))
        ):
            session.spooled = True
            held.checkpoint(STATE)
            if (yield from _verify(ctx, held, fd, digest)):
                os.close(fd)
                fd = -1  # closed before the rename, which Windows refuses on an open file
                _adopt(ctx, held, str(spool))
            return
        held.data()
        held.checkpoint(STATE)
        total = session.total_bytes or 0
        while session.bytes_written < total:
            n = min(ctx.settings.chunk_size, total - session.bytes_written)
            try:
                held.copy_in(fd, session.bytes_written, session.bytes_written, n)
            except OSError as exc:
                fail_write(ctx, held, exc)
                return
            except ValueError:  # the spool is shorter than the file: it was cut short
                held.data().truncate(session.bytes_written)
                _spool_cut_short(held)
                return
            session.bytes_written += n
            held.checkpoint()
            yield n
            if session.state != states.WRITING:
                return
        finish(ctx, held)
    finally:
        if fd >= 0:
            os.close(fd)


def _verify(ctx: Context, held: Held, fd: int, digest: Any | None) -> Generator[int, None, bool]:
    """A seed upload whose spool holds the whole file: hash it chunk by chunk (pause, progress
    and the rate limit work as for a copy); True once all of it is hashed. The spool then
    becomes the data by a rename, so the file is written once, by the front end, and the
    writer only reads it from the page cache. A spool this writer hashed while its body
    arrived (`follow`) comes with its `digest`: nothing is left to hash."""
    session = held.session
    total = session.total_bytes or 0
    if digest is not None and session.bytes_written == 0:
        held.sha256 = digest
        session.bytes_written = total
        return True
    hasher = held.hasher()
    while session.bytes_written < total:
        n = min(ctx.settings.chunk_size, total - session.bytes_written)
        try:
            with held.owner.reader.read(fd, session.bytes_written, n) as view:
                hasher.update(view)
            if ctx.settings.fsync != "never":
                fileio.start_writeback(fd, session.bytes_written, n)
        except ValueError:  # the spool is shorter than the file: it was cut short
            _spool_cut_short(held)
            return False
        session.bytes_written += n
        held.checkpoint()
        yield n
        if session.state != states.WRITING:
            return False
    return True


def _adopt(ctx: Context, held: Held, spool: str) -> None:
    assert isinstance(ctx.storage, Adopting)
    session = held.session
    total = session.total_bytes or 0
    try:
        adopted = ctx.storage.adopt(session.id, spool)
    except FileNotFoundError:  # the spool was removed under us (by hand, or a cleaner)
        _unspool(held, 0)
        _spool_missing(held)
        return
    except OSError as exc:
        fail_write(ctx, held, exc)
        return
    if not adopted:
        _unspool(held, 0)  # this storage cannot take the file: copy it after all
        held.checkpoint(STATE)
        ctx.scheduler.start_drain(session.id)
        return
    session.spooled = False
    metrics.get().bytes_written.inc(total)
    finish(ctx, held)


def _unspool(held: Held, bytes_written: int) -> None:
    """The spool is no longer this upload's data: count what the storage holds, and drop the
    running digest (it no longer describes those bytes)."""
    held.session.spooled = False
    held.session.bytes_written = bytes_written
    held.sha256 = None


def _spool_missing(held: Held) -> None:
    lifecycle.wait_for_file(
        held.session,
        "spool_missing",
        "the server no longer holds this upload's data; resume it by sending the file again",
    )
    held.checkpoint(STATE)


def _spool_cut_short(held: Held) -> None:
    lifecycle.wait_for_file(
        held.session,
        "spool_incomplete",
        "the spooled data ends early; resume by sending the file again",
    )
    held.checkpoint(STATE)
