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
import shutil
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upload_server import fileio
from upload_server.sessions import lifecycle
from upload_server.sessions import record as states
from upload_server.sessions.lifecycle import Refusal
from upload_server.sessions.record import Session
from upload_server.storage import Adopting

from .context import PARK, Context, Interrupted
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
        if lifecycle.is_whole(session):
            # The append that completes the upload is answered only once it is complete.
            if (yield from apply_segments(ctx, held, Requester(msg.request_id))) and settle(
                ctx, held, msg.request_id
            ):
                ctx.reply(msg.request_id, session)
            return
        requester = Requester(msg.request_id, behind=_writes_behind(ctx))
        requester.answer_early(ctx, held)
        stored = yield from apply_segments(ctx, held, requester)
        # Once a later append has made the upload whole, that append's task completes it.
        if stored and not lifecycle.is_whole(session) and settle(ctx, held, requester.request_id):
            ctx.reply(requester.request_id, session)
        return
    if session.segments and not (yield from apply_segments(ctx, held, Requester(msg.request_id))):
        discard_segment(msg)
        return
    yield from _append_checked(ctx, held, msg)


@dataclass
class Requester:
    """Who waits for an append's answer. `behind`: it may be answered as soon as its bytes are
    named in the record (they count, and a restart replays them) and the session's and this
    writer's bytes not yet in the data fit the write-behind budget, so the front end takes in the
    next PATCH while this writer copies; `request_id` is None once answered."""

    request_id: int | None
    behind: bool = False

    def answer_early(self, ctx: Context, held: Held) -> None:
        if not self.behind or self.request_id is None:
            return
        settings = ctx.settings
        behind = ctx.sessions.behind()
        if (
            held.behind() <= settings.write_behind
            and behind <= settings.write_behind_total
            and _free_space(ctx) >= behind + settings.write_behind
        ):
            ctx.reply(self.request_id, held.session)
            self.request_id = None
            held.told = max(held.told, held.session.bytes_written)


def _writes_behind(ctx: Context) -> bool:
    """Write-behind is on unless set to 0 or a rate limit is set: a client of a rate-limited
    session should feel the limit (and not fill the spool ahead of it)."""
    return ctx.settings.write_behind > 0 and not ctx.settings.max_bytes_per_second


def _free_space(ctx: Context) -> int:
    """Write-behind borrows disk space (a segment and its copy coexist for longer, and the next
    body arrives meanwhile): near a full disk each append is answered after its copy again, so
    the request whose bytes do not fit is the one told `disk_full`."""
    try:
        return shutil.disk_usage(ctx.layout.root).free
    except OSError:
        return 0


def _append_checked(ctx: Context, held: Held, msg: Append) -> Generator[int, None, None]:
    """Copy a body into the data while computing its Upload-Checksum; a mismatch (or a
    pause, which needs all of it) takes its bytes back out."""
    session = held.session
    lengths_before = _declare(session, msg)
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
                    _rollback(held, start, rollback, lengths_before)
                ctx.refuse(msg.request_id, session.id, stop)
                return
        if checksum is not None and checksum.digest() != msg.checksum[1]:
            _rollback(held, start, rollback, lengths_before)
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
    lengths_before = _declare(session, msg)
    session.segments.append([msg.offset, msg.length])
    session.bytes_written = msg.offset + msg.length
    lifecycle.start_writing(session)
    try:
        held.checkpoint(COMMIT)
    except OSError as exc:
        session.segments.pop()
        session.bytes_written = msg.offset
        session.total_bytes, session.announced_length = lengths_before
        discard_segment(msg)
        fail_write(ctx, held, exc, msg.request_id)
        return False
    return True


def apply_segments(
    ctx: Context, held: Held, requester: Requester | None = None
) -> Generator[int, None, bool]:
    """Copy every segment the record names into the data, in order, hashing on the way, and
    delete each file once its bytes are in the data. Only one task of a session copies at a
    time; another is parked until that one answers it, or, if it must wait for the copy, until
    the work is done. Stopped by a command (pause, terminate), the data goes back to where the
    unfinished segment starts: the segment stays named, and counted, and is copied again on
    resume. False when stopped, or when there is nothing left to do (answered while parked);
    the requester has been told. A write-behind requester is answered as soon as the budget
    has room (`Requester`)."""
    session = held.session
    requester = requester or Requester(None)
    if held.applying:
        # Another task is copying: it copies these segments too, settles the record, and answers
        # this requester as its copying makes room. Parked meanwhile (no turns of the loop spent
        # waiting); once answered there is nothing left to do. One that must be answered after
        # the copy (the append that completes the upload) goes on when the other is done.
        held.waiters.append(requester)
        try:
            while held.applying and requester.request_id is not None:
                yield PARK
        except Interrupted as stop:
            ctx.refuse(requester.request_id, session.id, stop)
            return False
        finally:
            held.waiters.remove(requester)
        if requester.request_id is None:
            return False
    held.applying = True
    try:
        while session.segments:
            offset, length = session.segments[0]
            if not (yield from _apply_segment(ctx, held, offset, length, requester)):
                return False
            session.segments.pop(0)
            held.applied = 0
        return True
    finally:
        held.applying = False
        held.applied = 0
        ctx.scheduler.wake(session.id)


def _apply_segment(
    ctx: Context,
    held: Held,
    offset: int,
    length: int,
    requester: Requester,
    adopt: bool | None = None,
) -> Generator[int, None, bool]:
    """Copy one segment into the data, hashing it. The first segment of an upload whose
    storage can adopt files is only hashed and then becomes the data by a rename (no copy: a
    one-PATCH upload is written once, by waitress); elsewhere it is copied chunk by chunk."""
    session = held.session
    path = ctx.layout.segment(session.id, offset)
    hasher = held.hasher()
    rollback = hasher.copy() if hasher is not None else None
    if adopt is None:
        adopt = _adoptable(ctx, held, offset)
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
                if adopt:
                    held.hash_in(fd, done, n)
                else:
                    held.copy_in(fd, done, offset + done, n)
            except (OSError, ValueError) as exc:
                held.sha256 = rollback
                fail_write(ctx, held, _as_os_error(exc, path), requester.request_id)
                return False
            done += n
            held.applied = done
            requester.answer_early(ctx, held)
            _answer_waiters(ctx, held)
            try:
                yield n
            except Interrupted as stop:
                held.data().truncate(offset)
                held.sha256 = rollback
                ctx.refuse(requester.request_id, session.id, stop)
                return False
        if adopt:
            os.close(fd)
            fd = -1  # closed before the rename, which Windows refuses on an open file
            if not _adopt_segment(ctx, held, path, length, requester):
                held.sha256 = rollback
                return (yield from _apply_segment(ctx, held, offset, length, requester, False))
            return session.state != states.FAILED
        if ctx.settings.fsync == "always":
            held.data().sync()
    finally:
        if fd >= 0:
            os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


def _answer_waiters(ctx: Context, held: Held) -> None:
    """Answer the parked appends whose bytes now fit the write-behind budget, and wake them:
    answered, their tasks end."""
    answered = False
    for waiting in held.waiters:
        if waiting.request_id is not None:
            waiting.answer_early(ctx, held)
            answered = answered or waiting.request_id is None
    if answered:
        ctx.scheduler.wake(held.session.id)


def _adoptable(ctx: Context, held: Held, offset: int) -> bool:
    """The segment is the upload's first bytes, nothing is stored yet, and the storage can
    take a file as the data (local files), with a running SHA-256 to continue."""
    return (
        offset == 0
        and isinstance(ctx.storage, Adopting)
        and held.hasher() is not None
        and not ctx.storage.size(held.session.id)
    )


def _adopt_segment(ctx: Context, held: Held, path: Path, length: int, requester: Requester) -> bool:
    """Rename the hashed segment into the data. From the rename on, the named segment whose
    file is gone is in the data (the offset's definition), so a crash on either side of it is
    consistent. False when the storage cannot adopt it (copy it instead); a failure fails the
    session (the requester has been told)."""
    assert isinstance(ctx.storage, Adopting)
    held.close_data()
    try:
        if not ctx.storage.adopt(held.session.id, str(path)):
            return False
        if ctx.settings.fsync == "always":
            held.data().sync()
    except OSError as exc:
        fail_write(ctx, held, exc, requester.request_id)
        return True
    held.owner.bytes_written.inc(length)
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
    if msg.announce_length is not None:
        lifecycle.draft_length(
            session, msg.offset, msg.length, complete=False, announced=msg.announce_length
        )


def _declare(session: Session, msg: Append) -> tuple[int | None, int | None]:
    """Take the lengths an append declares (tus's deferred length, the draft's announced one);
    returns the ones before, for a rollback."""
    before = session.total_bytes, session.announced_length
    if msg.declare_length is not None:
        session.total_bytes = msg.declare_length
    if msg.announce_length is not None and session.announced_length is None:
        session.announced_length = msg.announce_length
    return before


def _rollback(held: Held, offset: int, hasher: Any, lengths: tuple[int | None, int | None]) -> None:
    """Undo a refused append: its bytes, its part of the digest, and the lengths it declared."""
    held.data().truncate(offset)
    held.sha256 = hasher
    held.session.total_bytes, held.session.announced_length = lengths
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
