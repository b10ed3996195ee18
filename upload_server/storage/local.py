"""The default storage: files in the upload directory.

Data is written to `.upload_server/partial/<id>` and published by a hard link (or, where links are
not supported, an exclusive reservation and a rename) into the upload directory, so a finished file
appears whole, under its sanitized name, and never replaces an existing file.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .. import fileio, filenames
from ..layout import Layout
from ..sessions.store import fsync_dir


class LocalUploadData:
    def __init__(self, path: Path, writeback: bool) -> None:
        self.path = path
        self.writeback = writeback
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)

    def size(self) -> int:
        return fileio.file_size(self.fd)

    def write(self, data: memoryview, offset: int) -> None:
        fileio.pwrite_all(self.fd, data, offset)
        if self.writeback:
            fileio.start_writeback(self.fd, offset, len(data))

    def write_from(self, src_fd: int, src_offset: int, length: int, offset: int) -> None:
        fileio.copy_range(src_fd, src_offset, self.fd, offset, length)
        if self.writeback:
            fileio.start_writeback(self.fd, offset, length)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def commit(self, *, whole: bool) -> None:
        """Nothing to do: every process on this machine sees the file as written."""

    def sync(self) -> None:
        os.fsync(self.fd)

    @contextlib.contextmanager
    def view(self, offset: int, length: int) -> Iterator[memoryview]:
        with fileio.mapped(self.fd, offset, length) as view:
            yield view

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LocalStorage:
    """`writeback`: start writing data to disk as it comes (for uploads that will be synced)."""

    def __init__(self, layout: Layout, *, writeback: bool = False) -> None:
        self.layout = layout
        self.writeback = writeback
        self._next_suffix: dict[str, int] = {}  # sanitized name -> first suffix not known taken

    def open(self, session_id: str) -> LocalUploadData:
        return LocalUploadData(self.layout.partial(session_id), self.writeback)

    def size(self, session_id: str) -> int | None:
        try:
            return self.layout.partial(session_id).stat().st_size
        except FileNotFoundError:
            return None

    def publish(
        self, session_id: str, filename: str, *, durable: bool, note: Callable[[str], None]
    ) -> str:
        source = self.layout.partial(session_id)
        root = self.layout.root
        wanted = filenames.sanitize(filename)
        # Many clients send the same name ("blob", "image.jpg"): start where the last one ended,
        # so publishing stays one or two link attempts however many came before.
        for n, name in filenames.candidates(wanted, self._next_suffix.get(wanted, 0)):
            if not filenames.is_component(name):
                raise OSError(errno.EINVAL, f"refusing to publish outside {root}: {name!r}")
            if os.path.lexists(root / name):
                continue
            note(name)
            try:
                _link_or_reserve(source, root / name)
            except FileExistsError:
                continue
            self._next_suffix[wanted] = n + 1
            if durable:
                fsync_dir(root)
            return name
        raise AssertionError("unreachable: candidates() is infinite")

    def finish_publish(
        self, session_id: str, location: str, filename: str, *, durable: bool
    ) -> str:
        source, target = self.layout.partial(session_id), self._published(location)
        if not source.exists():
            if target.exists():
                return location  # linked and unlinked (or renamed) before the crash
            raise FileNotFoundError(f"upload {session_id}: neither its data nor {location} exist")
        if target.exists() and os.path.samefile(source, target):
            source.unlink()  # linked, not yet unlinked
            return location
        return self.publish(session_id, filename, durable=durable, note=lambda _: None)

    def adopt(self, session_id: str, path: str) -> bool:
        try:
            os.replace(path, self.layout.partial(session_id))
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                return False
            raise
        return True

    def discard(self, session_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.layout.partial(session_id).unlink()

    def remove(self, location: str) -> None:
        path = self._published(location)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def open_published(self, location: str | None, session_id: str) -> tuple[BinaryIO, int]:
        path = self._published(location) if location else self.layout.partial(session_id)
        handle = open(path, "rb")  # noqa: SIM115 - the caller streams and closes it
        return handle, os.fstat(handle.fileno()).st_size

    def _published(self, location: str) -> Path:
        path = self.layout.root / location
        if not filenames.is_inside(self.layout.root, path):
            raise FileNotFoundError(location)
        return path


def _link_or_reserve(source: Path, target: Path) -> None:
    """Move `source` to `target` unless `target` exists (FileExistsError)."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in {errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS}:
            raise
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(source, target)
        return
    source.unlink()
