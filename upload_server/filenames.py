"""Turn a client's filename into one that is safe to create inside the upload directory.

A client's filename is never trusted: only its last path component survives, characters that are
unsafe on Linux or Windows or misleading on screen (controls, bidirectional overrides) are
replaced, Windows device names are defused, hidden and empty names are renamed, and the result
fits in 200 bytes of UTF-8. Callers may rely on the result being a single
non-empty path component that does not start with a dot.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

MAX_NAME_BYTES = 200
# C0 and C1 controls, what Windows forbids, bidirectional overrides, embeddings, isolates and
# marks (U+202E makes "gpj.exe" read as "exe.jpg"), line and paragraph separators, and U+FFFD
# (what a filename's invalid UTF-8 bytes decode to)
_UNSAFE = re.compile(
    '[\x00-\x1f\x7f-\x9f<>:"/\\\\|?*\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ufffd]'
)
_WINDOWS_DEVICES = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    "CONIN$",
    "CONOUT$",
    *(f"COM{i}" for i in range(10)),
    *(f"LPT{i}" for i in range(10)),
    *(f"COM{c}" for c in "¹²³"),
    *(f"LPT{c}" for c in "¹²³"),
}


def sanitize(name: str | None, fallback: str = "upload") -> str:
    """Return a safe single-component filename for `name`, or `fallback` when nothing is left."""
    text = unicodedata.normalize("NFC", name or "")
    text = re.split(r"[/\\]", text)[-1]
    text = _UNSAFE.sub("_", text).strip().rstrip(". ")
    text = text.lstrip(". ")
    if not text:
        text = fallback
    if text.partition(".")[0].upper().rstrip(" ") in _WINDOWS_DEVICES:
        text = "_" + text
    return _truncate(text)


def _truncate(name: str) -> str:
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    stem, ext = os.path.splitext(name)
    if len(ext.encode()) > 32:
        stem, ext = name, ""
    budget = MAX_NAME_BYTES - len(ext.encode())
    stem = stem.encode()[:budget].decode(errors="ignore")
    return stem + ext


def candidates(name: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """Yield (n, candidate): `name`, `name (1).ext`, `name (2).ext`, ... from the `start`-th on, so
    that no existing file is overwritten."""
    stem, ext = os.path.splitext(name)
    n = start
    while True:
        yield n, name if n == 0 else _truncate_with_suffix(stem, f" ({n})", ext)
        n += 1


def is_component(name: str) -> bool:
    """A single, ordinary path component (what `sanitize` and `candidates` produce)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def _truncate_with_suffix(stem: str, suffix: str, ext: str) -> str:
    budget = MAX_NAME_BYTES - len(suffix.encode()) - len(ext.encode())
    return stem.encode()[:budget].decode(errors="ignore") + suffix + ext


def is_inside(directory: Path, path: Path) -> bool:
    """True when `path` resolves to a location inside `directory` (defence in depth)."""
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True
