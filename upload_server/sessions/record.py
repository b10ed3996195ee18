"""The session record: one flat record per upload, the same on disk, in the Manager dict and in memory.

Like tusd's FileInfo, a record is the whole truth about one upload that callers may rely on. It is
replaced whole wherever it is stored (the Manager dict does not proxy nested values, and a durable
record is rewritten atomically), so a reader never sees half an update.

Who writes it: the front end creates it; from then on only the session's writer process changes it
(progress, pause, resume, completion, termination), so two processes never race on one record. With
several nodes (cluster mode), the writer is the one on the node holding the upload's lease.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

# States a session moves through. `waiting` means incomplete with no data on the server to continue
# from: a tus upload between PATCH requests, or a seed upload whose spool was lost.
QUEUED = "queued"
WRITING = "writing"
WAITING = "waiting"
PAUSED = "paused"
COMPLETED = "completed"
FAILED = "failed"
TERMINATED = "terminated"
EXPIRED = "expired"

STATES = (QUEUED, WRITING, WAITING, PAUSED, COMPLETED, FAILED, TERMINATED, EXPIRED)
FINAL_STATES = frozenset({COMPLETED, TERMINATED, EXPIRED})

SEED = "seed"
TUS = "tus"
IETF = "ietf"  # Resumable Uploads for HTTP (the IETF draft): appended to like tus, completed explicitly
APPENDED = frozenset({TUS, IETF})  # the protocols whose uploads take request bodies at an offset


def new_session_id() -> str:
    """More than 128 random bits, URL-safe, no padding: unguessable and safe in paths and URLs.
    It starts with a letter or digit, so no command line mistakes it for an option."""
    while True:
        session_id = secrets.token_urlsafe(17)
        if session_id[0].isalnum():
            return session_id


def is_session_id(text: str) -> bool:
    return 16 <= len(text) <= 64 and all(c.isalnum() or c in "-_" for c in text)


@dataclass
class Session:
    id: str
    protocol: str
    filename: str
    chunk_size: int
    writer: int
    total_bytes: int | None = None
    bytes_written: int = 0
    state: str = QUEUED
    error: dict[str, str] | None = None
    filetype: str | None = None
    metadata: dict[str, str | None] = field(default_factory=dict)
    metadata_header: str | None = None
    location: str | None = None
    sha256: str | None = None
    expected_sha256: str | None = None
    owner: str | None = None
    # Whose share of the session limits this counts against when it has no owner (auth off): the
    # creating client's address key (`clients.client_key`). Never used to decide who may see it.
    client: str | None = None
    concat: str | None = None
    parts: list[str] = field(default_factory=list)
    # True while a seed upload's counted bytes are verified in its spool, which becomes its data
    # when whole (a rename instead of a copy); False once they are in the upload data.
    spooled: bool = False
    # The location being published, written down (durably) before it becomes visible, so that a
    # crash in the middle of publishing is finished at restart instead of losing the file.
    publishing: str | None = None
    # tus: request bodies already counted in `bytes_written` but not yet copied into the data, as
    # [offset, length] pairs, contiguous and in order; each is the spool file `<id>.<offset>.seg`.
    # So the offset is the bytes in the data plus the bytes in the segments named here.
    segments: list[list[int]] = field(default_factory=list)
    # The IETF draft: the length a client announced (`Upload-Length`) before it completes the
    # upload. `total_bytes` is set only by the request that completes it (see `lifecycle`).
    announced_length: int | None = None
    node: str | None = None  # cluster mode: the node that last wrote it (a seed's spool is there)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    expires_at: float | None = None
    # Set when retention reduced the record to a tombstone (`lifecycle.reduce_to_tombstone`).
    reduced_at: float | None = None

    @property
    def total_chunks(self) -> int:
        if self.total_bytes is None:
            return 0
        return -(-self.total_bytes // self.chunk_size)

    @property
    def uploaded_chunks(self) -> int:
        if self.total_bytes is not None and self.bytes_written >= self.total_bytes:
            return self.total_chunks
        return self.bytes_written // self.chunk_size

    @property
    def data_bytes(self) -> int:
        """How many of the counted bytes are in the upload's data (the rest are in segments)."""
        return self.segments[0][0] if self.segments else self.bytes_written

    @property
    def limit_key(self) -> str | None:
        """What the per-owner session limit counts this under: its owner (a credential), else
        the client that created it, else one shared bucket (records written before `client`)."""
        return self.owner if self.owner is not None else self.client

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    def set_error(self, code: str, message: str) -> None:
        self.error = {"code": code, "message": message}

    def to_dict(self) -> dict[str, Any]:
        """A copy that shares nothing mutable with the record. By hand, not `dataclasses.asdict`
        (which recurses through every value): a writer encodes a record several times per
        upload, and this is a tenth of the cost."""
        data = {name: getattr(self, name) for name in _FIELDS}
        data["error"] = dict(self.error) if self.error is not None else None
        data["metadata"] = dict(self.metadata)
        data["parts"] = list(self.parts)
        data["segments"] = [list(segment) for segment in self.segments]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Session:
        return cls(**{k: v for k, v in data.items() if k in _FIELD_SET})


_FIELDS = tuple(f.name for f in dataclasses.fields(Session))
_FIELD_SET = frozenset(_FIELDS)
