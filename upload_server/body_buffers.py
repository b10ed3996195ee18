"""waitress's body buffers, as this server makes them (`waitress_patches`).

A body past memory spills to a file in the spool directory, anonymous and linkable, so that a tus
PATCH body becomes its spool segment by a link (`SpoolFileBuffer`). A seed form's file starts at
its file part (`SplitFileBuffer`, where a `BodySplitter` says so: the bytes before it stay in
memory), so that part becomes its spool by a link too, and a writer can hash it as it arrives
(`seed_follow`). Everything here runs on waitress's I/O thread.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import waitress.buffers

from . import fileio

log = logging.getLogger("upload_server.waitress")


class BodySplitter(Protocol):
    """Asked, on waitress's I/O thread, where a body that spills past memory starts its file."""

    def split_at(self, method: str, path: str, headers: dict[str, str], head: bytes) -> int | None:
        """How many of the body's first bytes (`head`: all that arrived) stay in memory, the
        file starting after them; None: the file holds the whole body."""

    def spilled(self, headers: dict[str, str], file: BinaryIO) -> None:
        """A split body's file exists; it grows as the rest of the body arrives."""


class SpoolFileBuffer(waitress.buffers.TempfileBasedBuffer):
    """A body buffer's file: anonymous, in the spool directory, linkable into place."""

    def __init__(self, from_buffer: Any, directory: Path) -> None:
        self.directory = directory
        super().__init__(from_buffer)

    def newfile(self) -> BinaryIO:
        return fileio.linkable_tempfile(self.directory)


class SplitFileBuffer(SpoolFileBuffer):
    """A body buffer's file that starts `at` bytes into the body: the bytes before (a seed form
    up to its file part's content) stay in memory as `prefix`, so that the file is the file part
    and can become its spool by a link, with no copy (`RequestBody.link_part`)."""

    def __init__(self, from_buffer: Any, directory: Path, at: int) -> None:
        head = from_buffer.getfile().getvalue()
        self.prefix = head[:at]
        super().__init__(None, directory)
        self.file.write(head[at:])
        self.file.seek(0)
        self.remain = len(head)

    def getfile(self) -> BinaryIO:
        return SplitBody(self.prefix, self.file)  # type: ignore[return-value]


class SplitBody(io.RawIOBase):
    """A split body read as one stream (`wsgi.input`): `prefix`, then `file` from its start.
    `RequestBody` works on the two parts directly."""

    def __init__(self, prefix: bytes, file: BinaryIO) -> None:
        super().__init__()
        self.prefix = prefix
        self.file = file
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.file.fileno()

    def flush(self) -> None:
        if not self.file.closed:  # also called when this view is collected, after the buffer
            self.file.flush()

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.file.flush()
        size = len(self.prefix) + fileio.file_size(self.fileno())
        self._pos = offset + {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: size}[whence]
        return self._pos

    def readinto(self, buffer: Any) -> int:
        self.file.flush()
        split = len(self.prefix)
        if self._pos < split:
            chunk = self.prefix[self._pos : self._pos + len(buffer)]
        else:
            chunk = os.pread(self.fileno(), len(buffer), self._pos - split)
        buffer[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


class SpoolingBuffer(waitress.buffers.OverflowableBuffer):
    """waitress's body buffer (bytes in memory up to `overflow`, then a file), whose file is a
    `SpoolFileBuffer`, or a `SplitFileBuffer` where `split_at` says so (then `spilled` is told)."""

    def __init__(
        self,
        overflow: int,
        directory: Path,
        split_at: Callable[[bytes], int | None] | None = None,
        spilled: Callable[[BinaryIO], None] | None = None,
    ) -> None:
        super().__init__(overflow)
        self.directory = directory
        self.split_at = split_at
        self.spilled = spilled

    def _set_large_buffer(self) -> None:  # waitress's, with our file
        old = self.buf
        at = self._split_at(old)
        if at:
            self.buf = SplitFileBuffer(old, self.directory, at)
        else:
            self.buf = SpoolFileBuffer(old, self.directory)
        if hasattr(old, "close"):
            old.close()
        self.overflowed = True
        if at and self.spilled is not None:
            try:
                self.spilled(self.buf.file)
            except Exception:  # never let this break waitress's loop
                log.exception("the body splitter failed on a spilled body")

    def _split_at(self, old: Any) -> int | None:
        split_at, self.split_at = self.split_at, None  # asked once, at the first spill
        if split_at is None or old is None or not isinstance(old.getfile(), io.BytesIO):
            return None
        try:
            return split_at(old.getfile().getvalue())
        except Exception:  # never let this break waitress's loop
            log.exception("the body splitter failed on a request's first bytes")
            return None
