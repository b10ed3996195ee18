"""Where things live inside the upload directory.

    uploads/                      finished files, under their sanitized client filenames
    uploads/.upload_server/
        sessions/<id>.json        durable session records (FileSessionStore)
        spool/<id>.spool          a seed upload's bytes as received (byte i = file offset i)
        spool/<id>.<offset>.seg   one tus PATCH body (named in the record once counted)
        partial/<id>              data being written; moved into uploads/ when complete

Finished files never start with a dot (see `filenames.sanitize`), so a client can never name a file
into the internal folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .sessions.record import is_session_id

INTERNAL = ".upload_server"


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def internal(self) -> Path:
        return self.root / INTERNAL

    @property
    def sessions(self) -> Path:
        return self.internal / "sessions"

    @property
    def spool_dir(self) -> Path:
        return self.internal / "spool"

    @property
    def partial_dir(self) -> Path:
        return self.internal / "partial"

    def create(self) -> None:
        for path in (self.root, self.sessions, self.spool_dir, self.partial_dir):
            path.mkdir(parents=True, exist_ok=True)

    def _checked(self, session_id: str) -> str:
        if not is_session_id(session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        return session_id

    def spool(self, session_id: str) -> Path:
        return self.spool_dir / f"{self._checked(session_id)}.spool"

    def segment(self, session_id: str, offset: int) -> Path:
        return self.spool_dir / f"{self._checked(session_id)}.{int(offset)}.seg"

    def segment_size(self, session_id: str, offset: int) -> int | None:
        """The length of a segment file, or None when there is none."""
        try:
            return self.segment(session_id, offset).stat().st_size
        except FileNotFoundError:
            return None

    def partial(self, session_id: str) -> Path:
        return self.partial_dir / self._checked(session_id)
