"""Byte-moving primitives shared by the front end's spool and the writers.

They move bytes without Python-level copies where the OS allows: a range of one file to another with
`copy_file_range` (inside the kernel), bytes from memory with `pwrite` of a memoryview, and file
contents read through bounded `mmap` windows so that hashing reads the page cache directly and the
resident size of a process stays flat however large the file is.

Each Linux-only call has a fall-back for other systems; `portable.active()` (`--portable`) takes
the fall-backs on Linux too, so that the tests exercise them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from . import portable

WINDOW = 8 * 1024 * 1024
_GRANULARITY = mmap.ALLOCATIONGRANULARITY
_BINARY = getattr(os, "O_BINARY", 0)


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of `data` at `offset` (loops over short writes; raises OSError on failure).

    Every view taken here is released even when a write fails, so the caller's mmap can close."""
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            with view[done:] as rest:
                if hasattr(os, "pwrite") and not portable.ACTIVE:
                    done += os.pwrite(fd, rest, offset + done)
                else:  # Windows: one writer per file, so seek + write is safe
                    os.lseek(fd, offset + done, os.SEEK_SET)
                    done += os.write(fd, rest)


@contextlib.contextmanager
def window(fd: int, offset: int, length: int) -> Iterator[tuple[mmap.mmap, int]]:
    """A read-only map of at least `length` bytes at `offset` of `fd`, and where `offset` lies
    in it (a map starts at a multiple of the allocation granularity); unmapped on exit."""
    start = offset - offset % _GRANULARITY
    with mmap.mmap(fd, length + offset - start, offset=start, access=mmap.ACCESS_READ) as mm:
        yield mm, offset - start


@contextlib.contextmanager
def mapped(fd: int, offset: int, length: int) -> Iterator[memoryview]:
    """A read-only memoryview of `length` bytes at `offset` of `fd`, unmapped on exit."""
    if length == 0:
        yield memoryview(b"")
        return
    with window(fd, offset, length) as (mm, at):
        whole = memoryview(mm)
        view = whole[at : at + length]
        try:
            yield view
        finally:
            view.release()
            whole.release()


class ChunkReader:
    """Reads chunks of files into one buffer it reuses, as read-only views (valid until the
    block ends). Hashing from memory that stays in the CPU's caches costs less than from a
    fresh mmap window per chunk, whose pages must be faulted in: SHA-256 of 1 GiB from the page
    cache took 0.69 s of CPU against 0.84, and with the kernel's copy beside it
    (`copy_file_range`) 1.06-1.08 s against 1.21-1.25 (`benchmarks/micro.py hash`). The copy
    stays the kernel's: a `pwrite` from this buffer swung between 1.0 and 3.5 s/GiB with the
    machine's dirty memory (docs/PERFORMANCE.md). A file cut short raises ValueError, as a map
    past its end does; unlike a map, a file cut under the read cannot kill the process
    (SIGBUS). One per thread. Where `preadv` is missing (Windows), and for a chunk larger than
    `MAX_BUFFER` (a large `--chunk-size`: a buffer that size would stay resident), it maps."""

    MAX_BUFFER = 8 * 1024 * 1024

    def __init__(self) -> None:
        self._buffer = bytearray()

    @contextlib.contextmanager
    def read(self, fd: int, offset: int, length: int) -> Iterator[memoryview]:
        if not hasattr(os, "preadv") or portable.ACTIVE or length == 0 or length > self.MAX_BUFFER:
            with mapped(fd, offset, length) as view:
                yield view
            return
        if len(self._buffer) < length:
            self._buffer = bytearray(length)
        with memoryview(self._buffer) as whole, whole[:length] as chunk:
            done = 0
            while done < length:
                with chunk[done:] as rest:
                    n = os.preadv(fd, [rest], offset + done)
                if n == 0:
                    raise ValueError(
                        f"the file ends {length - done} bytes before {offset + length}"
                    )
                done += n
            with chunk.toreadonly() as view:
                yield view


def find(fd: int, needle: bytes, start: int, end: int) -> int:
    """Offset of `needle` in bytes [start, end) of file `fd`, or -1; maps one window at a time."""
    pos = start
    while pos < end:
        n = min(WINDOW, end - pos)
        with window(fd, pos, n) as (mm, at):
            found = mm.find(needle, at)
        if found >= 0:
            return pos - at + found
        if pos + n >= end:
            break
        pos += max(n - len(needle) + 1, 1)
    return -1


def pread(fd: int, length: int, offset: int) -> bytes:
    if hasattr(os, "pread") and not portable.ACTIVE:
        return os.pread(fd, length, offset)
    with mapped(fd, offset, length) as view:
        return bytes(view)


def windows(offset: int, length: int, size: int = WINDOW) -> Iterator[tuple[int, int]]:
    """Split `length` bytes from `offset` into (offset, length) pieces of at most `size`."""
    end = offset + length
    while offset < end:
        n = min(size, end - offset)
        yield offset, n
        offset += n


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
    """Copy `length` bytes between two files, inside the kernel where it can."""
    if hasattr(os, "copy_file_range") and not portable.ACTIVE:
        try:
            while length > 0:
                n = os.copy_file_range(src_fd, dst_fd, length, src_offset, dst_offset)
                if n == 0:
                    raise OSError(f"source ended {length} bytes early")
                src_offset += n
                dst_offset += n
                length -= n
            return
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
    for off, n in windows(src_offset, length):
        with mapped(src_fd, off, n) as view:
            pwrite_all(dst_fd, view, dst_offset + off - src_offset)


# copy_file_range is refused across some filesystems and by some kernels; fall back to mmap + pwrite.
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}


def linkable_tempfile(directory: os.PathLike | str) -> BinaryIO:
    """An anonymous temporary file in `directory` that can later be given a name (Linux
    O_TMPFILE without O_EXCL); elsewhere an ordinary temporary file. Its mode is a copied
    spool file's (`open_for_write`): a linked one may be published as it is."""
    if portable.ACTIVE:  # what systems without O_TMPFILE get: a file with no name, not linkable
        fd, name = tempfile.mkstemp(dir=directory)
        try:
            os.unlink(name)
        except OSError:
            os.close(fd)
            raise
        return open(fd, "w+b")
    if hasattr(os, "O_TMPFILE"):
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o644)
        except OSError:
            pass
        else:
            return open(fd, "w+b")
    return tempfile.TemporaryFile("w+b", dir=directory)


_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def link_anonymous(fd: int, path: os.PathLike | str) -> bool:
    """Give the anonymous file open as `fd` the name `path`, without copying it. False when the
    file cannot be linked (not from `linkable_tempfile`, another filesystem, not Linux)."""
    libc = _libc() if not portable.ACTIVE else None
    if libc is None:
        return False
    source = f"/proc/self/fd/{fd}".encode()
    result = libc.linkat(_AT_FDCWD, source, _AT_FDCWD, os.fsencode(path), _AT_SYMLINK_FOLLOW)
    return result == 0


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting for it (Linux
    sync_file_range). The fsync at the end of an upload then finds little left to write, so the
    disk works while the network does instead of after it."""
    libc = _libc() if not portable.ACTIVE else None
    if libc is not None:
        libc.sync_file_range(fd, ctypes.c_longlong(offset), ctypes.c_longlong(length), 2)


def open_for_write(path: os.PathLike | str, *, create: bool = True, exclusive: bool = False) -> int:
    flags = os.O_WRONLY | _BINARY
    if create:
        flags |= os.O_CREAT
    if exclusive:
        flags |= os.O_EXCL
    return os.open(path, flags, 0o644)


def open_for_read(path: os.PathLike | str) -> int:
    return os.open(path, os.O_RDONLY | _BINARY)


def file_size(fd: int) -> int:
    return os.fstat(fd).st_size
