"""tus 1.0.0 header formats, parsed and produced without any web framework.

Every parser raises `TusHeaderError` (a 400 for the client) on malformed input, never anything else,
so hostile headers cannot reach the rest of the server as strange values.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import re
import urllib.parse
from dataclasses import dataclass

VERSION = "1.0.0"
CHECKSUM_ALGORITHMS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")
EXTENSIONS = (
    "creation",
    "creation-with-upload",
    "creation-defer-length",
    "expiration",
    "checksum",
    "termination",
    "concatenation",
)
OFFSET_OCTET_STREAM = "application/offset+octet-stream"
MAX_INTEGER = 2**63 - 1
MAX_PARTS = 1000

_DIGITS = re.compile(r"^[0-9]{1,19}$")
_KEY = re.compile(r"^[^\s,]+$")


class TusHeaderError(ValueError):
    """A tus header is malformed: answer 400 with this message."""


def parse_integer(name: str, value: str | None) -> int | None:
    """A non-negative decimal integer header (Upload-Offset, Upload-Length), or None if absent."""
    if value is None:
        return None
    text = value.strip()
    if not _DIGITS.match(text) or int(text) > MAX_INTEGER:
        raise TusHeaderError(f"{name} must be a non-negative integer, not {value[:40]!r}")
    return int(text)


def parse_metadata(value: str | None, max_bytes: int) -> dict[str, str | None]:
    """Upload-Metadata: comma-separated `key base64value` pairs (the value may be absent)."""
    if value is None or not value.strip():
        return {}
    if len(value) > max_bytes:
        raise TusHeaderError(f"Upload-Metadata is longer than {max_bytes} bytes")
    result: dict[str, str | None] = {}
    for pair in value.split(","):
        pieces = pair.strip().split(" ")
        if len(pieces) > 2 or not pieces[0] or not _KEY.match(pieces[0]):
            raise TusHeaderError(f"malformed Upload-Metadata pair {pair.strip()[:60]!r}")
        key = pieces[0]
        if key in result:
            raise TusHeaderError(f"Upload-Metadata repeats the key {key[:60]!r}")
        result[key] = _b64decode_text(key, pieces[1]) if len(pieces) == 2 else None
    return result


def _b64decode_text(key: str, encoded: str) -> str:
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise TusHeaderError(f"Upload-Metadata value of {key[:60]!r} is not base64") from None
    return raw.decode("utf-8", errors="replace")


def encode_metadata(metadata: dict[str, str | None]) -> str:
    return ",".join(
        key if value is None else f"{key} {base64.b64encode(value.encode()).decode()}"
        for key, value in metadata.items()
    )


def parse_checksum(value: str | None) -> tuple[str, bytes] | None:
    """Upload-Checksum: `<algorithm> <base64 digest>`; an unsupported algorithm is a 400."""
    if value is None:
        return None
    algorithm, _, encoded = value.strip().partition(" ")
    algorithm = algorithm.lower()
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise TusHeaderError(
            f"unsupported checksum algorithm {algorithm[:20]!r}; "
            f"supported: {', '.join(CHECKSUM_ALGORITHMS)}"
        )
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise TusHeaderError("the Upload-Checksum digest is not base64") from None
    if not digest:
        raise TusHeaderError("the Upload-Checksum digest is empty")
    return algorithm, digest


@dataclass(frozen=True)
class Concat:
    kind: str  # "partial" or "final"
    parts: tuple[str, ...] = ()


def parse_concat(value: str | None, base_path: str) -> Concat | None:
    """Upload-Concat: `partial`, or `final;<url> <url> ...` naming uploads under `base_path`."""
    if value is None:
        return None
    text = value.strip()
    if text == "partial":
        return Concat("partial")
    if not text.startswith("final;"):
        raise TusHeaderError("Upload-Concat must be 'partial' or 'final;<upload URLs>'")
    urls = text[len("final;") :].split()
    if not urls:
        raise TusHeaderError("Upload-Concat final names no uploads")
    if len(urls) > MAX_PARTS:
        raise TusHeaderError(f"Upload-Concat final names more than {MAX_PARTS} uploads")
    return Concat("final", tuple(upload_id_from_url(url, base_path) for url in urls))


def upload_id_from_url(url: str, base_path: str) -> str:
    """The upload id in an absolute or relative upload URL under `base_path`."""
    path = urllib.parse.urlsplit(url).path
    if not path.startswith(base_path):
        raise TusHeaderError(f"{url[:100]!r} is not an upload of this server")
    upload_id = path[len(base_path) :].strip("/")
    if not upload_id or "/" in upload_id:
        raise TusHeaderError(f"{url[:100]!r} is not an upload URL")
    return upload_id


def parse_defer_length(value: str | None) -> bool:
    if value is None:
        return False
    if value.strip() != "1":
        raise TusHeaderError("Upload-Defer-Length must be 1")
    return True


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)
