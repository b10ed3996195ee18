"""HTTP Range (RFC 9110 section 14) for downloads: one byte range, or the whole representation.

A malformed header or a list of several ranges is ignored (the whole file is served, as RFC 9110
allows); a range that starts past the end is unsatisfiable (416).
"""

from __future__ import annotations

import re

_RANGE = re.compile(r"^bytes=\s*(\d{0,19})\s*-\s*(\d{0,19})\s*$")


class Unsatisfiable(Exception):
    """No byte of the requested range exists: answer 416 with `Content-Range: bytes */size`."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end) with `end` exclusive, or None to serve the whole file."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if not match:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # a suffix: the last N bytes
        length = int(last)
        if length == 0:
            raise Unsatisfiable(header)
        return max(0, size - length), size
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if last and int(last) < start:
        return None  # invalid: ignore the header
    if start >= size:
        raise Unsatisfiable(header)
    return start, end
