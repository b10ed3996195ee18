"""Resumable Uploads for HTTP (draft-ietf-httpbis-resumable-upload): its header formats and the
differences between the interop versions clients speak, without any web framework.

A client names the iteration it implements in `Upload-Draft-Interop-Version`. What changed
between the versions this server speaks (see docs/IETF-DRAFT.md for the table):

- 3 (draft -01): `Upload-Incomplete` (true while incomplete) instead of `Upload-Complete`.
- 4 (draft -02): `Upload-Complete`. 5 (draft -03): progress `104`s.
- 6 (drafts -04, -05): appends carry `application/partial-upload`; `Upload-Limit` (`expires`);
  the problem types `mismatching-upload-offset` and `completed-upload`; `Upload-Length`.
- 7 (drafts -06 to -08): `max-age` replaces `expires`; `inconsistent-upload-length`.
- 8 (drafts -09 to -12): the current one.

Every parser raises `DraftHeaderError` on malformed input: the caller answers a problem response.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

VERSION_HEADER = "Upload-Draft-Interop-Version"
CURRENT = 8
PARTIAL_UPLOAD = "application/partial-upload"
PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://iana.org/assignments/http-problem-types#"
MISMATCHING_OFFSET = PROBLEM_BASE + "mismatching-upload-offset"
INCONSISTENT_LENGTH = PROBLEM_BASE + "inconsistent-upload-length"
COMPLETED_UPLOAD = PROBLEM_BASE + "completed-upload"

_SF_INTEGER = re.compile(r"^-?[0-9]{1,15}$")
_MARKERS = ("Upload-Complete", "Upload-Incomplete", VERSION_HEADER)


class DraftHeaderError(ValueError):
    """A draft header is malformed or missing: answer 400 with this message."""

    def __init__(self, message: str, code: str = "bad_header") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Dialect:
    """What one interop version says where the versions differ."""

    version: int
    inverted: bool = False  # interop 3: `Upload-Incomplete: ?1` means not complete
    progress: bool = True  # interim 104s carrying Upload-Offset (from interop 5)
    append_type: str | None = PARTIAL_UPLOAD  # the media type an append must carry
    limits: bool = True  # Upload-Limit in responses (from interop 6)
    age_key: str = "max-age"  # the Upload-Limit key of the remaining lifetime
    problem_types: frozenset[str] = frozenset(
        {MISMATCHING_OFFSET, INCONSISTENT_LENGTH, COMPLETED_UPLOAD}
    )

    @property
    def complete_header(self) -> str:
        return "Upload-Incomplete" if self.inverted else "Upload-Complete"

    def completeness(self, complete: bool) -> tuple[str, str]:
        """The header that says whether an upload is complete, in this version's words."""
        return self.complete_header, boolean(complete != self.inverted)

    def problem_type(self, uri: str) -> str:
        """A problem type this version defines, else `about:blank` (RFC 9457)."""
        return uri if uri in self.problem_types else "about:blank"


_OLD = dict(append_type=None, limits=False, problem_types=frozenset())
DIALECTS: dict[int, Dialect] = {
    3: Dialect(3, inverted=True, progress=False, **_OLD),  # type: ignore[arg-type]
    4: Dialect(4, progress=False, **_OLD),  # type: ignore[arg-type]
    5: Dialect(5, **_OLD),  # type: ignore[arg-type]
    6: Dialect(
        6, age_key="expires", problem_types=frozenset({MISMATCHING_OFFSET, COMPLETED_UPLOAD})
    ),
    7: Dialect(7),
    8: Dialect(8),
}


Headers = Callable[[str], "str | None"]  # a request's header by name (any case), or None


def speaks_draft(header: Headers) -> bool:
    """Does a request speak the draft rather than tus? It names an interop version, or says
    whether it completes the upload, and does not say `Tus-Resumable` (tusd tells them apart
    the same way)."""
    if header("Tus-Resumable") is not None:
        return False
    return any(header(name) is not None for name in _MARKERS)


def dialect(value: str | None) -> Dialect:
    """The dialect of `Upload-Draft-Interop-Version`; a missing or unknown version is refused
    (and gets no 104: the draft forbids one then)."""
    if value is None:
        raise DraftHeaderError(
            f"send {VERSION_HEADER} (this server speaks {versions_text()})",
            code="missing_interop_version",
        )
    number = parse_integer(VERSION_HEADER, value)
    if number not in DIALECTS:
        raise DraftHeaderError(
            f"{VERSION_HEADER} {value.strip()[:20]} is not one this server speaks "
            f"({versions_text()})",
            code="unsupported_interop_version",
        )
    return DIALECTS[number]


def versions_text() -> str:
    return ", ".join(str(v) for v in sorted(DIALECTS))


def parse_boolean(name: str, value: str | None) -> bool | None:
    """An RFC 9651 Boolean item (`?0`, `?1`; parameters are ignored), or None if absent."""
    if value is None:
        return None
    item = value.split(";", 1)[0].strip()
    if item == "?1":
        return True
    if item == "?0":
        return False
    raise DraftHeaderError(f"{name} must be a structured boolean ?0 or ?1, not {value[:20]!r}")


def boolean(value: bool) -> str:
    return "?1" if value else "?0"


def parse_integer(name: str, value: str | None) -> int | None:
    """A non-negative RFC 9651 Integer item (at most 15 digits; parameters ignored)."""
    if value is None:
        return None
    item = value.split(";", 1)[0].strip()
    if not _SF_INTEGER.match(item) or item.startswith("-"):
        raise DraftHeaderError(
            f"{name} must be a non-negative structured integer (at most 15 digits), "
            f"not {value[:40]!r}"
        )
    return int(item)


def parse_complete(dialect: Dialect, header: Headers) -> bool | None:
    """Does the request complete the upload? None when it does not say (interop 3: an absent
    `Upload-Incomplete` means complete)."""
    value = parse_boolean(dialect.complete_header, header(dialect.complete_header))
    if dialect.inverted:
        return True if value is None else not value
    return value


def upload_limit(
    dialect: Dialect, *, max_size: int, max_append: int, max_age: int | None
) -> str | None:
    """The `Upload-Limit` dictionary (RFC 9651) of this server's real limits, or None for the
    versions before it."""
    if not dialect.limits:
        return None
    members = [f"max-size={max_size}", "min-size=0", f"max-append-size={max_append}"]
    if max_age is not None:
        members.append(f"{dialect.age_key}={max(0, max_age)}")
    return ", ".join(members)


# RFC 9530 algorithms this server verifies, by the hashlib name the writers compute them with
DIGEST_ALGORITHMS = {"sha-256": "sha256", "sha-512": "sha512"}
_DIGEST_MEMBER = re.compile(r"^([a-z][a-z0-9_.*-]*)\s*=\s*:([A-Za-z0-9+/=]*):\s*(;.*)?$")


def parse_digests(name: str, value: str | None) -> dict[str, bytes]:
    """`Repr-Digest` / `Content-Digest` (RFC 9530): an RFC 9651 dictionary of byte sequences,
    by algorithm. Unknown algorithms are kept (the caller uses those it knows)."""
    if value is None or not value.strip():
        return {}
    digests: dict[str, bytes] = {}
    for member in value.split(","):
        match = _DIGEST_MEMBER.match(member.strip())
        if not match:
            raise DraftHeaderError(f"{name} is not a digest dictionary: {member.strip()[:60]!r}")
        try:
            digests[match.group(1)] = base64.b64decode(match.group(2), validate=True)
        except (binascii.Error, ValueError):
            raise DraftHeaderError(f"{name} has a malformed {match.group(1)} value") from None
    return digests


def known_digest(name: str, value: str | None) -> tuple[str, bytes] | None:
    """The strongest digest of a `*-Digest` field this server can verify, as (hashlib name,
    digest); None when the field is absent or names only algorithms it does not know."""
    digests = parse_digests(name, value)
    for algorithm in ("sha-512", "sha-256"):
        if algorithm in digests:
            return DIGEST_ALGORITHMS[algorithm], digests[algorithm]
    return None


_DISPOSITION_NAME = re.compile(r"""filename\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))""", re.I)
_DISPOSITION_EXT = re.compile(r"filename\*\s*=\s*([A-Za-z0-9_-]+)'[^']*'([^;\s]+)", re.I)


def disposition_filename(value: str | None) -> str | None:
    """The filename of a `Content-Disposition` (RFC 6266): `filename*` (RFC 8187) first, else
    `filename`; the caller sanitizes it like any client-given name."""
    if not value:
        return None
    extended = _DISPOSITION_EXT.search(value)
    if extended:
        charset = extended.group(1).lower()
        try:
            return urllib.parse.unquote(extended.group(2), encoding=charset, errors="replace")
        except LookupError:
            pass
    plain = _DISPOSITION_NAME.search(value)
    if plain:
        name = plain.group(1) if plain.group(1) is not None else plain.group(2)
        return re.sub(r"\\(.)", r"\1", name)
    return None
