"""multipart/form-data (RFC 7578) parsed in place: parts are located, never copied.

`parse` walks a `RequestBody` (anything with `find`, `read` and `length`) and returns each part's
headers and the byte range of its content, so a file part can be moved to the spool by the kernel.
Everything a hostile client can inflate is bounded: the number of parts, the size of a part's headers
and the size of a plain form field. Malformed input raises `MultipartError` with a message a client
can act on.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

MAX_PARTS = 256
MAX_HEADER_BYTES = 16 * 1024
MAX_FIELD_BYTES = 64 * 1024


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data."""


class Body(Protocol):
    length: int

    def find(self, needle: bytes, start: int, end: int | None = None) -> int: ...

    def read(self, start: int, end: int) -> bytes: ...


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str | None
    start: int
    end: int
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.end - self.start


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM = re.compile(rf'\s*;\s*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))')


def parse_header_params(value: str) -> tuple[str, dict[str, str]]:
    """Split `type; a=1; b="x y"` into ("type", {"a": "1", "b": "x y"}); keys are lower-cased."""
    head, _, rest = value.partition(";")
    params: dict[str, str] = {}
    rest = ";" + rest if rest else ""
    pos = 0
    while pos < len(rest):
        match = _PARAM.match(rest, pos)
        if not match:
            break
        key = match.group(1).lower()
        quoted, token = match.group(2), match.group(3)
        # like browsers and cgi.parse_header: only \\ and \" are escapes (Windows paths keep \)
        params[key] = (
            quoted.replace("\\\\", "\\").replace('\\"', '"') if quoted is not None else token
        )
        pos = match.end()
    return head.strip().lower(), params


def boundary_of(content_type: str | None) -> str:
    """The boundary of a multipart/form-data Content-Type, or MultipartError."""
    if not content_type:
        raise MultipartError("missing Content-Type: send multipart/form-data")
    kind, params = parse_header_params(content_type)
    if kind != "multipart/form-data":
        raise MultipartError(f"Content-Type is {kind!r}, not multipart/form-data")
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= 70:
        raise MultipartError("multipart/form-data needs a boundary of 1 to 70 characters")
    return boundary


def parse(body: Body, boundary: str, ends: Mapping[int, int] | None = None) -> list[Part]:
    """Locate every part of `body`. The closing delimiter must be present (else: truncated).
    `ends` maps a part's content start to where the first delimiter after it was found already
    (a seed form's file part, by the writer that hashed it as it arrived: `seed_follow`): a
    delimiter there is taken without searching the part again."""
    return list(_walk(body, boundary, None, ends or {}))


def content_start(head: Body, boundary: str, name: str) -> int | None:
    """Where the content of the first part called `name` starts, from a body's first bytes
    alone (its end need not have arrived): None when they do not show it."""
    try:
        for part in _walk(head, boundary, name, {}):
            if part.name == name:
                return part.start
    except MultipartError:
        return None
    return None


def _walk(
    body: Body, boundary: str, open_name: str | None, ends: Mapping[int, int]
) -> Iterator[Part]:
    """The parts of `body` in order; a part called `open_name` is the last, its end not looked
    for (`end` = `start`)."""
    delimiter = b"--" + boundary.encode("latin-1")
    if body.read(0, len(delimiter)) == delimiter:
        pos = len(delimiter)
    else:
        found = body.find(b"\r\n" + delimiter, 0)
        if found < 0:
            raise MultipartError("no multipart boundary found in the body")
        pos = found + 2 + len(delimiter)
    count = 0
    while True:
        after = body.read(pos, pos + 2)
        if after == b"--":
            return
        # transport padding (RFC 2046) before the CRLF that ends a delimiter line
        line_end = body.find(b"\r\n", pos, pos + 256)
        if line_end < 0 or body.read(pos, line_end).strip(b" \t"):
            raise MultipartError("malformed multipart delimiter line (truncated body?)")
        headers_start = line_end + 2
        headers_end = body.find(
            b"\r\n\r\n", headers_start - 2, headers_start + MAX_HEADER_BYTES + 2
        )
        if headers_end < 0:
            if body.length - headers_start > MAX_HEADER_BYTES:
                raise MultipartError(f"part headers exceed {MAX_HEADER_BYTES} bytes")
            raise MultipartError("part headers are not terminated (truncated body?)")
        headers = _parse_headers(body.read(headers_start, headers_end))
        start = headers_end + 4
        if open_name is not None and (part := _make_part(headers, start, start)).name == open_name:
            yield part
            return
        end = ends.get(start, -1)
        if end < start or body.read(end, end + 2 + len(delimiter)) != b"\r\n" + delimiter:
            end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise MultipartError("the body ends before the closing boundary (truncated upload?)")
        if count >= MAX_PARTS:
            raise MultipartError(f"more than {MAX_PARTS} parts")
        count += 1
        yield _make_part(headers, start, end)
        pos = end + 2 + len(delimiter)


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not raw:
        return headers
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep or not name.strip():
            raise MultipartError("malformed part header line")
        # browsers send UTF-8 filenames raw; a byte that is not UTF-8 becomes U+FFFD (no byte
        # sequence is fatal), which `filenames.sanitize` replaces like any unsafe character
        text = value.decode("utf-8", errors="replace")
        headers[name.decode("latin-1").strip().lower()] = text.strip()
    return headers


def _make_part(headers: dict[str, str], start: int, end: int) -> Part:
    disposition = headers.get("content-disposition")
    if not disposition:
        raise MultipartError("a part has no Content-Disposition header")
    kind, params = parse_header_params(disposition)
    if kind != "form-data" or "name" not in params:
        raise MultipartError("a part's Content-Disposition is not form-data with a name")
    filename = params.get("filename")
    extended = params.get("filename*")
    if extended and "''" in extended:
        charset, _, encoded = extended.partition("''")
        try:
            filename = urllib.parse.unquote(encoded, encoding=charset or "utf-8", errors="strict")
        except (LookupError, UnicodeDecodeError):
            raise MultipartError("undecodable filename* parameter") from None
    return Part(
        name=params["name"],
        filename=filename,
        content_type=headers.get("content-type"),
        start=start,
        end=end,
        headers=headers,
    )
