"""Random access to a request body that the WSGI server has already received.

waitress reads every request body completely before it calls the app: into memory (a `BytesIO`)
while it is small, into an anonymous temporary file past `inbuf_overflow`. `RequestBody` works on that
buffer in place, so the front end neither reads the body into Python objects nor copies it through
Python: boundaries are found with `find` over bounded mmap windows, and a range is moved to a spool
file with `copy_file_range` (file) or `pwrite` of a memoryview (memory). A seed form's body may be
split (its first bytes in memory, its file starting at its file part), and that part then becomes
its spool by a link. Other WSGI servers hand over a plain stream; it is first copied to a
temporary file, which makes the same operations possible.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from . import fileio

_READ = 1024 * 1024


class BodyTooLarge(Exception):
    """The body is larger than the caller's limit."""


class RequestBody:
    """A read-only, random-access view of a request body of `length` bytes."""

    def __init__(self, stream: BinaryIO, length: int | None, scratch_dir: Path, limit: int) -> None:
        self._owned: BinaryIO | None = None
        self._bytes: bytes | None = None
        self._prefix = b""  # a split body's first bytes, before its file (`SplitBody`)
        self._fd = -1
        self._base = 0  # file offset = body offset + _base, past the prefix
        if isinstance(stream, io.BytesIO):
            data = stream.getvalue()[stream.tell() :]
            self._bytes = data if length is None else data[:length]
            self.length = len(self._bytes)
        else:
            prefix = getattr(stream, "prefix", None)
            if isinstance(prefix, bytes):  # body_buffers.SplitBody
                self._prefix, stream = prefix, stream.file  # type: ignore[attr-defined]
            elif not _real_file(stream):
                stream = self._owned = _copy_stream(stream, length, scratch_dir, limit)
            stream.flush()
            self._fd = stream.fileno()
            self._base = stream.tell() - len(self._prefix)
            available = os.fstat(self._fd).st_size - self._base
            self.length = available if length is None else min(length, available)
        if self.length > limit:
            self.close()
            raise BodyTooLarge(self.length)

    def find(self, needle: bytes, start: int, end: int | None = None) -> int:
        """Offset of `needle` in [start, end), or -1."""
        end = self.length if end is None else min(end, self.length)
        if self._bytes is not None:
            return self._bytes.find(needle, start, end)
        split = len(self._prefix)
        if start < split:  # a match that starts in the prefix, perhaps ending in the file
            found = self.read(start, min(end, split + len(needle) - 1)).find(needle)
            if found >= 0:
                return start + found
            start = split
        found = fileio.find(self._fd, needle, self._base + start, self._base + end)
        return found - self._base if found >= 0 else -1

    def read(self, start: int, end: int) -> bytes:
        """A small range as bytes (part headers, form fields), never file contents."""
        end = min(end, self.length)
        if start >= end:
            return b""
        if self._bytes is not None:
            return self._bytes[start:end]
        head = self._prefix[start:end]
        start += len(head)
        if start >= end:
            return head
        return head + fileio.pread(self._fd, end - start, self._base + start)

    def copy_to(self, fd: int, start: int, end: int, dest_offset: int) -> None:
        """Write body bytes [start, end) into file `fd` at `dest_offset`, without Python copies."""
        if end <= start:
            return
        if self._bytes is not None:
            with memoryview(self._bytes) as view, view[start:end] as part:
                fileio.pwrite_all(fd, part, dest_offset)
            return
        head = self._prefix[start:end]
        if head:
            fileio.pwrite_all(fd, head, dest_offset)
            start, dest_offset = start + len(head), dest_offset + len(head)
        if start < end:
            fileio.copy_range(self._fd, self._base + start, fd, dest_offset, end - start)

    def link_to(self, path: Path) -> bool:
        """Name the server's own buffer file `path` when it holds exactly this body (a tus PATCH
        body that waitress spilled to a linkable temporary file): no copy at all."""
        if self._bytes is not None or self._owned is not None or self._base != 0:
            return False
        if os.fstat(self._fd).st_size != self.length:
            return False
        return fileio.link_anonymous(self._fd, path)

    @property
    def split(self) -> int:
        """Bytes of a split body kept in memory before its file (0: not split)."""
        return len(self._prefix)

    def starts_file(self, start: int) -> bool:
        """Whether the server's own buffer file starts at body offset `start` (a seed form
        split at its file part, `body_buffers.SplitFileBuffer`)."""
        return self._bytes is None and self._owned is None and self._base + start == 0

    def link_part(self, start: int, end: int, path: Path) -> bool:
        """Name the server's buffer file `path`, cut to body bytes [start, end), when it starts
        at `start`: a split seed form's file part becomes its spool with no copy. The body's
        bytes past `end` are gone from then on."""
        if not self.starts_file(start) or end > self.length:
            return False
        if not fileio.link_anonymous(self._fd, path):
            return False
        try:
            os.truncate(path, end - start)
        except OSError:
            os.unlink(path)
            return False
        self.length = end
        return True

    def key(self) -> tuple[int, int] | None:
        """(device, inode) of the server's own buffer file holding this body, or None (a body
        in memory, or copied from another server's stream)."""
        if self._bytes is not None or self._owned is not None:
            return None
        status = os.fstat(self._fd)
        return status.st_dev, status.st_ino

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()
            self._owned = None


def _real_file(stream: BinaryIO) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False
    return bool(getattr(stream, "seekable", lambda: False)())


def _copy_stream(stream: BinaryIO, length: int | None, scratch_dir: Path, limit: int) -> BinaryIO:
    """Copy a non-file body (other WSGI servers) to a temporary file, refusing past `limit`."""
    out = tempfile.TemporaryFile(dir=scratch_dir)  # noqa: SIM115 - returned to the caller
    total = 0
    while length is None or total < length:
        want = _READ if length is None else min(_READ, length - total)
        chunk = stream.read(want)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            out.close()
            raise BodyTooLarge(total)
        out.write(chunk)
    out.seek(0)
    return out


def received_prefix(buffer: Any) -> tuple[BinaryIO, int]:
    """What a body buffer holds, as a stream from its start: waitress's own file when the body
    spilled to one (so it can still be linked into the spool), else a copy of the few bytes."""
    inner = buffer.buf
    if inner is None:
        return io.BytesIO(buffer.strbuf), len(buffer.strbuf)
    file = inner.getfile()
    if isinstance(file, io.BytesIO):
        data = file.getvalue()
        return io.BytesIO(data), len(data)
    file.flush()
    file.seek(0)
    return file, len(inner)
