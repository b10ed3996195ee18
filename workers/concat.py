"""tus concatenation: a final upload built from complete partial uploads, in order."""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Generator

from upload_server import fileio, metrics
from upload_server.sessions import record as states
from upload_server.sessions.lifecycle import Refusal

from .context import Context
from .finish import fail_write, finish
from .messages import Concat


def concat(ctx: Context, msg: Concat) -> Generator[int, None, None]:
    """Copy each part's published bytes into the final upload's data, hashing on the way (the
    parts' own digests say nothing of the whole), then finish it like any upload."""
    try:
        held = ctx.sessions.hold(msg.session_id)
    except Refusal as exc:
        ctx.refuse(msg.request_id, msg.session_id, exc)
        return
    session = held.session
    data = held.data()
    data.truncate(0)
    session.bytes_written = 0
    held.sha256 = hashlib.sha256()
    session.state = states.WRITING
    counter = metrics.get().bytes_written
    for part_id in msg.parts:
        try:
            handle, size = ctx.storage.open_published(None, part_id)
        except OSError as exc:
            fail_write(ctx, held, exc, msg.request_id)
            return
        try:
            with handle:
                for _, n in fileio.windows(0, size, ctx.settings.chunk_size):
                    block = handle.read(n)
                    if len(block) != n:
                        raise OSError(errno.EIO, f"partial upload {part_id} ended early")
                    held.sha256.update(block)
                    data.write(memoryview(block), session.bytes_written)
                    counter.inc(n)
                    session.bytes_written += n
                    yield n
        except OSError as exc:
            fail_write(ctx, held, exc, msg.request_id)
            return
    session.total_bytes = session.bytes_written
    if finish(ctx, held, msg.request_id):
        ctx.reply(msg.request_id, session)
