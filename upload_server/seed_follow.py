"""A seed form's file part stored with no copy, and hashed while its body still arrives.

waitress reads a `POST /upload` whole before the app sees it. When its body spills past memory
(512 KiB), `split_at` (on waitress's I/O thread) finds in what arrived where the first `file`
part's content starts, and the body's file starts there (`body_buffers.SplitFileBuffer`): the
front end can then make that file the part's spool by a link (`RequestBody.link_part`) instead
of copying it. `spilled` tells a writer about the file (`WriterPool.follow`), which hashes the
part as it arrives (`workers/follow.py`). Once the request is complete, the parser takes the
part's end from that writer (`part_ends`) rather than search a gigabyte for it again, and
`SessionService` claims the digest for the new session: its drain has nothing left to hash.
Receiving, spooling and hashing then overlap instead of running one after another. Linux only (the link needs O_TMPFILE,
the writer opens the file through /proc); not with `--portable`; under a rate limit (which paces
the writer) the part is linked but not followed.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import BinaryIO

from workers.messages import Follow
from workers.pool import WriterPool

from . import portable
from .protocol import multipart
from .received_body import RequestBody

PATH = "/upload"


class SeedFollower:
    """The `body_buffers.BodySplitter` of a server with the seed API."""

    def __init__(self, pool: WriterPool, scratch_dir: Path, *, follow: bool) -> None:
        self.pool = pool
        self.scratch_dir = scratch_dir
        self.follow = follow

    @staticmethod
    def available() -> bool:
        """Whether bodies can be split and followed here (see the module's docstring)."""
        return (
            sys.platform.startswith("linux")
            and not portable.ACTIVE
            and os.path.isdir(f"/proc/{os.getpid()}/fd")
        )

    def split_at(self, method: str, path: str, headers: dict[str, str], head: bytes) -> int | None:
        """A seed form splits at its first file part's content, when `head` shows it."""
        if method != "POST" or path != PATH:
            return None
        boundary = _boundary(headers)
        if boundary is None:
            return None
        body = RequestBody(io.BytesIO(head), None, self.scratch_dir, len(head))
        return multipart.content_start(body, boundary, "file") or None

    def spilled(self, headers: dict[str, str], file: BinaryIO) -> None:
        """Have a writer hash the part as it arrives."""
        boundary = _boundary(headers)
        if not self.follow or boundary is None:
            return
        fd = file.fileno()
        status = os.fstat(fd)
        needle = b"\r\n--" + boundary.encode("latin-1")
        self.pool.follow(Follow((status.st_dev, status.st_ino), os.getpid(), fd, needle))


def part_ends(body: RequestBody, pool: WriterPool) -> dict[int, int]:
    """Where a split seed form's file part ends, as the writer that hashed it while it arrived
    found it, for the parser (`multipart.parse`): {content start: end}, or {}."""
    key, start = body.key(), body.split
    if key is None or not start or not body.starts_file(start):
        return {}
    length = pool.locate(key)
    return {} if length is None else {start: start + length}


def _boundary(headers: dict[str, str]) -> str | None:
    try:
        return multipart.boundary_of(headers.get("CONTENT_TYPE"))
    except multipart.MultipartError:
        return None
