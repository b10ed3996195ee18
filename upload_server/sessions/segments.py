"""What a tus upload's offset means, and how it is checked against what is on disk.

`Upload-Offset` (the record's `bytes_written`) counts the bytes in the upload's data plus those in
the spool segments the record names (`Session.segments`: request bodies already counted but not
yet copied into the data). A segment file is deleted only once its bytes are in the data, so a
named segment whose file is gone is in the data. After a crash both the front end (start-up) and
a writer (first touch of a session) bring a record back to what the disk holds with
`reconcile_stored`, over `reconcile`, the one place where that rule is written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..layout import Layout
from ..storage.base import CommittedData, Storage, UploadData
from . import lifecycle
from .record import Session

log = logging.getLogger("upload_server.sessions")


def reconcile(session: Session, data_size: int, segment_size: Callable[[int], int | None]) -> int:
    """Make `session` count exactly the bytes the disk holds for it; return the length its data
    should be cut back to (bytes past it were never counted, or are copies of a segment that is
    still there and will be copied again).

    `data_size` is the data's length; `segment_size(offset)` the length of the segment file for
    `offset`, or None when it is gone. Named segments are kept while their files are whole;
    a segment the data already covers was copied before a crash; the first one that is neither
    (lost with unsynced writes on a power loss) ends the count there."""
    kept: list[list[int]] = []
    end = min(data_size, session.data_bytes)
    for offset, length in session.segments:
        if offset != end:
            break  # a gap: nothing after it can count
        size = segment_size(offset)
        if size is not None and size >= length:
            kept.append([offset, length])
        elif not kept and data_size >= offset + length:
            pass  # copied into the data before the crash
        else:
            break
        end = offset + length
    counted = end
    if counted != session.bytes_written or kept != session.segments:
        if counted < session.bytes_written:
            log.warning(
                "session %s: record says %d bytes, the disk holds %d; continuing from %d",
                session.id,
                session.bytes_written,
                counted,
                counted,
            )
        if counted < session.bytes_written:
            lifecycle.lose_state(session, counted)
        session.bytes_written = counted
        session.segments = kept
    return session.data_bytes


def reconcile_stored(
    session: Session, storage: Storage, layout: Layout, data: UploadData | None = None
) -> bool:
    """Count what the storage and the spool hold for `session` (`reconcile`); True when the
    record changed. Start-up passes no `data` and only corrects the record. A writer passes the
    data it opened, and bytes past the count are cut: they were never acknowledged, or are copies
    of a named segment that is copied again; unless the storage committed them (S3: an append
    whose record was lost), which makes them the offset."""
    before = (session.bytes_written, len(session.segments))
    size = data.size() if data is not None else storage.size(session.id) or 0
    cut_to = reconcile(session, size, lambda offset: layout.segment_size(session.id, offset))
    if data is not None and size > cut_to:
        try:
            data.truncate(cut_to)
        except CommittedData:
            log.warning(
                "session %s: storage holds %d committed bytes, record says %d; keeping them",
                session.id,
                size,
                session.bytes_written,
            )
            session.bytes_written = size
            session.segments = []
    return (session.bytes_written, len(session.segments)) != before
