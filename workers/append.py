"""tus append: one request body (a PATCH) stored at the upload's offset.

A plain body is first named in the record as a segment (from then on it counts, and survives a
crash), then copied into the data, and its file deleted once its bytes are in the data. A body
with an Upload-Checksum (or any body where the policy keeps no segments: a shared store) is copied
while its checksum is computed and counts only once it matches; a mismatch, or a command that
stops it, takes its bytes back out.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

from upload_server import fileio
from upload_server.sessions import lifecycle
from upload_server.sessions import record as states
from upload_server.sessions.lifecycle import Refusal
from upload_server.sessions.record import Session

from .context import Context, Interrupted
from .finish import fail_write, finish
from .held import COMMIT, Held
from .messages import Append


def append(ctx: Context, msg: Append) -> Generator[int, None, None]:
    """Store one request body and answer its requester."""
    try:
        held = ctx.sessions.hold(msg.session_id)
        session = held.session
        if _already_applied(session, msg):
            ctx.reply(msg.request_id, session)
            return
        recorded = [msg.offset, msg.length] in session.segments
        if not recorded:
            _check_appendable(held, msg)
    except Refusal as exc:
        discard_segment(msg)
        ctx.refuse(msg.request_id, msg.session_id, exc)
        return
    if msg.length and msg.checksum is None and ctx.policy.segments:
        if not recorded and not _record_segment(ctx, held, msg):
            return
        if (yield from apply_segments(ctx, held, msg.request_id)) and settle(
            ctx, held, msg.request_id
        ):
            ctx.reply(msg.request_id, session)
        return
    if session.segments and not (yield from apply_segments(ctx, held, msg.request_id)):
        discard_segment(msg)
        return
    yield from _append_checked(ctx, held, msg)


def _append_checked(ctx: Context, held: Held, msg: Append) -> Generator[int, None, None]:
    """Copy a body into the data while computing its Upload-Checksum; a mismatch (or a
    pause, which needs all of it) takes its bytes back out."""
    session = held.session
    length_before = session.total_bytes
    if msg.declare_length is not None:
        session.total_bytes = msg.declare_length
    checksum = hashlib.new(msg.checksum[0]) if msg.checksum else None
    hasher = held.hasher()
    rollback = hasher.copy() if hasher is not None else None
    start = session.bytes_written
    fd = fileio.open_for_read(msg.segment) if msg.length else -1
    try:
        done = 0
        if msg.length:
            session.state = states.WRITING
            held.show()
        while done < msg.length:
            n = min(ctx.settings.chunk_size, msg.length - done)
            try:
                held.copy_in(fd, done, start + done, n, checksum)
            except OSError as exc:
                held.sha256 = rollback
                fail_write(ctx, held, exc, msg.request_id)
                return
            done += n
            try:
                yield n
            except Interrupted as stop:
                whole = session.total_bytes is not None and start + done >= session.total_bytes
                if checksum is None and stop.code == lifecycle.PAUSED and not whole:
                    # Keep what is stored (tus: a server SHOULD): the client goes on from here.
                    session.bytes_written = start + done
                    if not settle(ctx, held, msg.request_id, start, rollback):
                        return
                else:
                    _rollback(held, start, rollback, length_before)
                ctx.refuse(msg.request_id, session.id, stop)
                return
        if checksum is not None and checksum.digest() != msg.checksum[1]:
            _rollback(held, start, rollback, length_before)
            ctx.outbox.reply(
                msg.request_id,
                session,
                code="checksum_mismatch",
                message=f"the {msg.checksum[0]} checksum of the request body does "
                "not match Upload-Checksum; the chunk was discarded",
            )
            return
        session.bytes_written = start + msg.length
        if settle(ctx, held, msg.request_id, start, rollback):
            ctx.reply(msg.request_id, session)
    finally:
        if fd >= 0:
            os.close(fd)
        discard_segment(msg)


def _record_segment(ctx: Context, held: Held, msg: Append) -> bool:
    """Name the body's segment in the record and count it: durable per the fsync policy (the
    front end synced the segment itself under `always`). False when the record could not be
    written; the requester has been told."""
    session = held.session
    length_before = session.total_bytes
    if msg.declare_length is not None:
        session.total_bytes = msg.declare_length
    session.segments.append([msg.offset, msg.length])
    session.bytes_written = msg.offset + msg.length
    lifecycle.start_writing(session)
    try:
        held.checkpoint(COMMIT)
    except OSError as exc:
        session.segments.pop()
        session.bytes_written = msg.offset
        session.total_bytes = length_before
        discard_segment(msg)
        fail_write(ctx, held, exc, msg.request_id)
        return False
    return True


def apply_segments(ctx: Context, held: Held, request_id: int | None) -> Generator[int, None, bool]:
    """Copy every segment the record names into the data, in order, hashing on the way, and
    delete each file once its bytes are in the data. Only one task of a session copies at a
    time; another waits and finds the work done. Stopped by a command (pause, terminate),
    the data goes back to where the unfinished segment starts: the segment stays named, and
    counted, and is copied again on resume. False when stopped; the requester has been told."""
    session = held.session
    try:
        while held.applying:
            yield 0
    except Interrupted as stop:
        ctx.refuse(request_id, session.id, stop)
        return False
    held.applying = True
    try:
        while session.segments:
            offset, length = session.segments[0]
            if not (yield from _apply_segment(ctx, held, offset, length, request_id)):
                return False
            session.segments.pop(0)
        return True
    finally:
        held.applying = False


def _apply_segment(
    ctx: Context, held: Held, offset: int, length: int, request_id: int | None
) -> Generator[int, None, bool]:
    session = held.session
    path = ctx.layout.segment(session.id, offset)
    hasher = held.hasher()
    rollback = hasher.copy() if hasher is not None else None
    try:
        fd = fileio.open_for_read(path)
    except FileNotFoundError:
        fd = -1
    try:
        session.state = states.WRITING
        held.show()
        done = 0
        while done < length:
            n = min(ctx.settings.chunk_size, length - done)
            try:
                if fd < 0:
                    raise ValueError("segment missing")
                held.copy_in(fd, done, offset + done, n)
            except (OSError, ValueError) as exc:
                held.sha256 = rollback
                fail_write(ctx, held, _as_os_error(exc, path), request_id)
                return False
            done += n
            try:
                yield n
            except Interrupted as stop:
                held.data().truncate(offset)
                held.sha256 = rollback
                ctx.refuse(request_id, session.id, stop)
                return False
        if ctx.settings.fsync == "always":
            held.data().sync()
    finally:
        if fd >= 0:
            os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


def settle(
    ctx: Context, held: Held, request_id: int | None, start: int | None = None, hasher: Any = None
) -> bool:
    """After an append: complete the upload if that was its last byte, else commit the record
    (a record that cannot be written counts none of the append: back to `start`)."""
    session = held.session
    if session.state == states.COMPLETED:
        return True  # another task of the session got there first
    if lifecycle.is_whole(session):
        return finish(ctx, held, request_id)
    lifecycle.wait_for_data(session)
    try:
        held.checkpoint(COMMIT)
    except OSError as exc:
        if start is not None:
            session.bytes_written = start
            held.sha256 = hasher
        fail_write(ctx, held, exc, request_id)
        return False
    return True


def _already_applied(session: Session, msg: Append) -> bool:
    """A request re-sent after a writer restart whose bytes were committed before it died."""
    return (
        msg.length > 0
        and msg.offset + msg.length == session.bytes_written
        and [msg.offset, msg.length] not in session.segments
        and not os.path.exists(msg.segment)
    )


def _check_appendable(held: Held, msg: Append) -> None:
    """The session rules (`lifecycle.check_append`) against the record as this writer holds
    it, reconciled with the data first: the record's offset is trusted only then."""
    session = held.session
    lifecycle.check_writable(session)
    try:
        held.data()
    except OSError as exc:
        raise Refusal(
            "storage_unavailable", f"the upload's storage failed: {exc}; try again"
        ) from None
    lifecycle.check_append(session, msg.offset, msg.length, declared=msg.declare_length)


def _rollback(held: Held, offset: int, hasher: Any, total_bytes: int | None) -> None:
    """Undo a refused append: its bytes, its part of the digest, and a length it declared."""
    held.data().truncate(offset)
    held.sha256 = hasher
    held.session.total_bytes = total_bytes
    held.session.state = states.WAITING
    held.show()


def discard_segment(msg: Append) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(msg.segment)


def _as_os_error(exc: OSError | ValueError, path: Path) -> OSError:
    """A segment that is gone or shorter than recorded is an I/O error of the upload's storage."""
    if isinstance(exc, OSError):
        return exc
    return OSError(errno.EIO, f"the spool segment {path.name} is missing or short")
