"""The state file: the upload URL of every unfinished upload, so a later run resumes it.

An upload is keyed by the tus endpoint, the file's absolute path, its size and its modification
time: a file changed since (new size or mtime) starts a new upload instead of resuming into a
mismatched one. The file is rewritten whole (temporary file, then rename) on every change, so a
Ctrl-C or a crash never leaves it half-written, and an entry exists from the moment the server has
created the upload, before its first byte is sent.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

VERSION = 1


class StateError(Exception):
    """The state file exists but cannot be used."""


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._read()  # fail now, not halfway through a run

    @staticmethod
    def key(endpoint: str, path: Path, size: int, mtime_ns: int) -> str:
        return f"{endpoint} {path} {size} {mtime_ns}"

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._read().get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        with self._lock:
            uploads = self._read()
            uploads[key] = entry
            self._write(uploads)

    def remove(self, key: str) -> None:
        with self._lock:
            uploads = self._read()
            if uploads.pop(key, None) is not None:
                self._write(uploads)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StateError(f"cannot read the state file {self.path}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("uploads"), dict):
            raise StateError(f"{self.path} is not an upload-client state file")
        return data["uploads"]

    def _write(self, uploads: dict[str, Any]) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            temporary.write_text(
                json.dumps({"version": VERSION, "uploads": uploads}, indent=2), encoding="utf-8"
            )
            os.replace(temporary, self.path)
        except OSError as exc:
            raise StateError(f"cannot write the state file {self.path}: {exc}") from None
