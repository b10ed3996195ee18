"""How a session's work ends: completed and published, failed by a write, or discarded.

Completion is `lifecycle.complete`, the same transition restart recovery uses for a publish a
crash interrupted (`Runtime._finish_publish`); the `completed` event sent here is what fires the
post-finish hook and the completion metric in the front end.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os

from upload_server import fileio
from upload_server.sessions import lifecycle
from upload_server.sessions.record import Session
from upload_server.storage import ReadBack

from .context import Context
from .held import STATE, Held

log = logging.getLogger("upload_server.writer")


def finish(ctx: Context, held: Held, request_id: int | None = None) -> bool:
    """Complete the upload: commit and sync, check the declared digest, publish it. False
    when that failed; the requester, if any, has then been told why.

    Without a running SHA-256 (storage that cannot be read back, once the upload moved between
    nodes or its writer restarted) the digest comes from streaming the published file once:
    the price of not being able to read an unfinished S3 multipart upload. A partial upload
    (concatenation) is published only where that is the only way to read it back."""
    session = held.session
    durable = ctx.settings.fsync != "never"
    hasher = held.hasher()
    data = held.data()
    try:
        data.commit(whole=True)
        if durable:
            data.sync()
    except OSError as exc:
        fail_write(ctx, held, exc, request_id)
        return False
    if hasher is not None and not _digest_ok(ctx, held, hasher.hexdigest(), request_id):
        return False
    try:
        if session.concat != "partial" or not isinstance(data, ReadBack):
            held.close_data()
            session.location = ctx.storage.publish(
                session.id,
                session.filename,
                durable=durable,
                note=lambda location: _note_publishing(held, location),
            )
        digest = hasher.hexdigest() if hasher is not None else _published_digest(ctx, session)
    except OSError as exc:
        fail_write(ctx, held, exc, request_id)
        return False
    if hasher is None and not _digest_ok(ctx, held, digest, request_id):
        return False
    lifecycle.complete(session, None)
    held.checkpoint(STATE)
    ctx.outbox.emit("completed", session)
    ctx.remove_spool(session.id)
    held.release()
    return True


def _note_publishing(held: Held, location: str) -> None:
    """Write down, durably, where the data is about to appear: a crash from here on is
    finished at restart (`Runtime._recover`), not mistaken for lost data. Only that recovery
    reads the note, from the store: the live view goes straight from writing to completed
    (one Manager round trip fewer per upload)."""
    held.session.publishing = location
    held.session.spooled = False
    held.checkpoint(STATE, live=False)


def _published_digest(ctx: Context, session: Session) -> str:
    handle, _ = ctx.storage.open_published(session.location, session.id)
    digest = hashlib.sha256()
    with handle:
        for block in iter(lambda: handle.read(fileio.WINDOW), b""):
            digest.update(block)
    return digest.hexdigest()


def _digest_ok(ctx: Context, held: Held, digest: str, request_id: int | None) -> bool:
    """Record the digest; a file that does not match the declared one is failed and removed."""
    session = held.session
    session.sha256 = digest
    if not session.expected_sha256 or session.expected_sha256 == digest:
        return True
    lifecycle.fail(
        session,
        "digest_mismatch",
        f"the file's SHA-256 is {digest}, not the "
        f"declared {session.expected_sha256}; it was discarded",
    )
    if session.location:
        ctx.storage.remove(session.location)
        session.location = None
    discard_data(ctx, held)
    ctx.remove_spool(session.id)
    held.checkpoint(STATE)
    ctx.outbox.emit("failed", session)
    held.release()
    ctx.outbox.reply(request_id, session, **session.error)
    return False


def discard_data(ctx: Context, held: Held) -> None:
    """The upload's bytes are given up (terminated, expired, or a digest that did not match)."""
    held.close_data()
    ctx.storage.discard(held.session.id)
    _uncount_segments(ctx, held, disk_full=False)
    held.session.bytes_written = 0
    held.sha256 = None


def _uncount_segments(ctx: Context, held: Held, *, disk_full: bool) -> None:
    """Count only what is in the data, and the named segments that must stay: after a full
    disk, those a client was already told are stored (`Held.told`: write-behind answered them
    early, or an earlier process named them) stay named and counted, and are copied again when
    the upload goes on (its next PATCH, a resume, a restart). The others are given up: their
    client is told, and sends those bytes again. Any other failure gives every segment up (an
    unreadable segment would fail every retry)."""
    session = held.session
    kept = [s for s in session.segments if disk_full and s[0] < held.told]
    for offset, _ in session.segments[len(kept) :]:
        with contextlib.suppress(FileNotFoundError):
            ctx.layout.segment(session.id, offset).unlink()
    in_data = session.data_bytes
    session.segments = kept
    session.bytes_written = kept[-1][0] + kept[-1][1] if kept else in_data


def fail_write(ctx: Context, held: Held, exc: OSError, request_id: int | None = None) -> None:
    """A write failed: count nothing past what is stored (the data, and after a full disk the
    segments a client was told of) and tell the client why."""
    session = held.session
    disk_full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    code = "disk_full" if disk_full else "io_error"
    message = f"writing the upload failed: {os.strerror(exc.errno) if exc.errno else exc}"
    log.error("session %s: %s", session.id, message)
    with contextlib.suppress(OSError):
        held.data().truncate(session.data_bytes)
    _uncount_segments(ctx, held, disk_full=disk_full)
    with contextlib.suppress(OSError):
        held.close_data()  # reopened from what the storage holds when work resumes
    held.sha256 = None
    lifecycle.fail(session, code, message)
    with contextlib.suppress(OSError):
        held.checkpoint(STATE)
    ctx.outbox.emit("failed", session)
    ctx.outbox.reply(request_id, session, code=code, message=message)
