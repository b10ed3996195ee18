"""The public JSON view of a session: the seed API's status object, also used by hooks and tools."""

from __future__ import annotations

import datetime
from typing import Any

from .sessions import record as states
from .sessions.record import Session


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat().replace("+00:00", "Z")


def status_of(session: Session) -> dict[str, Any]:
    """The seed's status object, with the fields this server adds."""
    return {
        "sessionID": session.id,
        "uploadedChunks": session.uploaded_chunks,
        "totalChunks": session.total_chunks,
        "paused": session.state == states.PAUSED,
        "completed": session.state == states.COMPLETED,
        "terminated": session.state == states.TERMINATED,
        "bytesWritten": session.bytes_written,
        # a draft upload's length is the announced one until its client completes it
        "totalBytes": session.total_bytes
        if session.total_bytes is not None
        else session.announced_length,
        "chunkSize": session.chunk_size,
        "filename": session.filename,
        "storedAs": session.location,
        "state": session.state,
        "error": session.error,
        "protocol": session.protocol,
        "sha256": session.sha256,
        "createdAt": _iso(session.created_at),
        "updatedAt": _iso(session.updated_at),
        "expiresAt": _iso(session.expires_at),
    }
