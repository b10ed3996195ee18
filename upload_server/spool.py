"""The front end's half of the hand-off to the writers: request bodies into spool files.

A spool file is written under a temporary name and renamed into place only when whole, so a writer
(or a restarted server) never sees a partly written one. The copy is done by the kernel from the WSGI
server's own buffer (see `received_body.RequestBody.copy_to`), which keeps this extra hop cheap.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from . import metrics
from .fileio import open_for_write
from .layout import Layout
from .received_body import RequestBody


class Spool:
    def __init__(self, layout: Layout, *, sync: bool) -> None:
        self.layout = layout
        self.sync = sync

    def write_seed(
        self, session_id: str, body: RequestBody, start: int, end: int, skip: int
    ) -> None:
        """Spool body[start + skip:end] at offset `skip`: spool offset i is file offset i, and
        bytes a writer already has are not copied again (they stay a hole). A whole part that
        waitress's buffer file starts with is linked, not copied (`RequestBody.link_part`:
        the body's bytes past `end` are gone then)."""
        target = self.layout.spool(session_id)
        if not skip and self._link(
            target, lambda tmp: body.link_part(start, end, tmp), end - start
        ):
            return
        self._write(target, body, start + skip, end, skip, end - start)

    def write_segment(
        self, session_id: str, offset: int, body: RequestBody, start: int, end: int
    ) -> Path:
        """Spool one tus request body, bound for upload offset `offset`: by naming waitress's own
        buffer file when it can (no copy), else by a kernel copy."""
        target = self.layout.segment(session_id, offset)
        if not (start == 0 and end == body.length and self._link(target, body.link_to, end)):
            self._write(target, body, start, end, 0, end - start)
        return target

    def _link(self, target: Path, link: Callable[[Path], bool], size: int) -> bool:
        """Put a body's own buffer file in place as `target` by `link` (under a temporary name,
        synced per the policy, renamed); False when it cannot be linked."""
        tmp = target.with_name(target.name + ".tmp")
        if not link(tmp):
            return False
        if self.sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
        metrics.get().bytes_spooled.labels("linked").inc(size)
        return True

    def _write(
        self, target: Path, body: RequestBody, start: int, end: int, at: int, size: int
    ) -> None:
        tmp = target.with_name(target.name + ".tmp")
        fd = open_for_write(tmp)
        try:
            os.ftruncate(fd, size)
            body.copy_to(fd, start, end, at)
            if self.sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        os.replace(tmp, target)
        metrics.get().bytes_spooled.labels("copied").inc(end - start)

    def seed_size(self, session_id: str) -> int | None:
        """Size of a seed session's spool, or None when there is none."""
        try:
            return self.layout.spool(session_id).stat().st_size
        except FileNotFoundError:
            return None
