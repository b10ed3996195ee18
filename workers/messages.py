"""The messages between the front end and its writer processes.

Each writer has an inbox (a pipe written only by the front end) and a reply pipe. Work arrives in the
inbox as `Drain`, `Append`, `Concat`, and a seed form's `Follow`, `Locate` and `Claim`; `Shutdown` asks the
writer to checkpoint and exit. Control (pause, resume, terminate, expire) travels on the
session's own control queue, a
`multiprocessing.Manager` queue as the design card asks; the inbox carries only a `Nudge` that tells an
idle or busy writer to read that queue now, so the writer never pays a Manager round trip per chunk
just to find the queue empty, and a command is applied in order with the work queued before it.

Every message that expects an answer has a `request_id`; the writer answers with one `Reply`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Drain:
    """Copy a seed upload's spool into its data from the durable offset to the end. No reply is
    awaited; the pool re-sends it after a writer restart for every session still `writing`."""

    session_id: str


@dataclass(frozen=True)
class Follow:
    """A seed form's file part is arriving in the front end's file `fd` (process `pid`, inode
    `key`), which starts with it: hash it up to the first `needle` while it grows
    (`follow.py`). No reply; a `Claim` takes the digest."""

    key: tuple[int, int]
    pid: int
    fd: int
    needle: bytes


@dataclass(frozen=True)
class Locate:
    """The followed body `key` is complete: answer once its file part is hashed, with the
    part's length (`Reply.length`: where the first delimiter is, so the front end's parser
    need not look for it again), or refuse."""

    request_id: int
    key: tuple[int, int]


@dataclass(frozen=True)
class Claim:
    """The followed body `key` is complete and its file part, `length` bytes, is the spool of
    `session_id`: keep its SHA-256 for the session's drain. Refused when that is not what was
    hashed; the drain then hashes the spool itself."""

    request_id: int
    session_id: str
    key: tuple[int, int]
    length: int


@dataclass(frozen=True)
class Append:
    """Append a spooled request body (a tus PATCH) at `offset`; reply once it is stored or refused.

    `checksum` is (algorithm, expected digest) from Upload-Checksum; `declare_length` sets a deferred
    Upload-Length in the same step; `announce_length` records an IETF draft upload's announced
    length (`Upload-Length` on an append that does not complete it)."""

    request_id: int
    session_id: str
    segment: str
    offset: int
    length: int
    checksum: tuple[str, bytes] | None = None
    declare_length: int | None = None
    announce_length: int | None = None


@dataclass(frozen=True)
class Concat:
    """Build a final upload from complete partial uploads (tus concatenation), in order."""

    request_id: int
    session_id: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class Command:
    """One control command, put on the session's control queue."""

    request_id: int
    action: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Nudge:
    """A command waits on `queue`, the session's control queue (a Manager queue proxy)."""

    session_id: str
    queue: Any


@dataclass(frozen=True)
class Ping:
    """Answer at once: the readiness check's proof that a writer is alive and not stuck."""

    request_id: int


@dataclass(frozen=True)
class Shutdown:
    """Finish the current chunk, checkpoint every session, and exit."""


@dataclass(frozen=True)
class Event:
    """News the front end did not ask for: `progress` (at most once a second per session) and the
    end of a session (`completed`, `failed`, `terminated`, `expired`), for hooks and limits."""

    kind: str
    session: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """The outcome of a request: the session record after it, or a refusal's code and message
    (the front end decides what a client is told: `api/refusals.py`)."""

    request_id: int
    session: dict[str, Any] | None = None
    code: str | None = None
    message: str | None = None
    length: int | None = None  # a `Locate`d part's

    @property
    def ok(self) -> bool:
        return self.code is None
