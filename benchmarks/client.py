"""The one client every target gets: keep-alive `http.client` connections sending from memory.

Bodies are slices of one preallocated random buffer (`Pattern`), handed to `sendall` as memoryviews,
so the client does no per-byte Python work and never allocates a body; the loopback target shows how
fast that is. The same functions drive every target, so bytes, framing and request sizes match.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any
from urllib.parse import urlsplit

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

MAX_PIECE = 32 * MiB  # the largest slice handed to sendall (and the largest PATCH)
PATTERN_LENGTH = (
    64 * MiB + 4099
)  # not a multiple of any request size: misplaced chunks change digests
TUS = {"Tus-Resumable": "1.0.0"}


class Unsupported(Exception):
    """The target does not serve this API (404/405 where the API should be)."""


class RequestFailed(Exception):
    """A request got an answer a correct server does not give."""


class Pattern:
    """Random bytes that every upload's content is cut from, with a different phase per upload.

    The buffer is `PATTERN_LENGTH + MAX_PIECE` long (its tail repeats its head), so any piece of up
    to `MAX_PIECE` bytes at any position is one contiguous memoryview.
    """

    def __init__(self) -> None:
        head = os.urandom(PATTERN_LENGTH)
        self.view = memoryview(head + head[:MAX_PIECE])
        self._next_phase = 0
        self._count = 0
        self._digests: dict[tuple[int, int], str] = {}

    def payload(self, size: int) -> Payload:
        """The content of a new upload of `size` bytes, different from the previous ones."""
        self._next_phase = (self._next_phase + 7_340_033) % PATTERN_LENGTH
        self._count += 1
        return Payload(self, self._next_phase, size, self._count)

    def digest(self, payload: Payload) -> str:
        key = (payload.phase, payload.size)
        if key not in self._digests:
            hasher = hashlib.sha256()
            for piece in payload.views(0, payload.size):
                hasher.update(piece)
            self._digests[key] = hasher.hexdigest()
        return self._digests[key]


@dataclass(frozen=True)
class Payload:
    """Upload content: byte i is `pattern[(phase + i) % PATTERN_LENGTH]`."""

    pattern: Pattern
    phase: int
    size: int
    index: int  # names the upload: like distinct files, uploads have distinct names

    @property
    def filename(self) -> str:
        return f"bench-{self.index}.bin"

    def views(self, start: int, end: int, piece: int = MAX_PIECE) -> Iterator[memoryview]:
        """Bytes [start, end) as memoryviews of at most `piece` bytes, without copying."""
        piece = min(piece, MAX_PIECE)
        for pos in range(start, end, piece):
            begin = (self.phase + pos) % PATTERN_LENGTH
            yield self.pattern.view[begin : begin + min(piece, end - pos)]

    @property
    def sha256(self) -> str:
        return self.pattern.digest(self)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Connection:
    """One keep-alive HTTP/1.1 connection. Reopened when idle for `idle_limit` seconds, because
    servers close idle connections (node after 5 s) and a request on a closed one would fail."""

    host: str
    port: int
    timeout: float = 300.0
    idle_limit: float = 2.0
    source: str | None = None  # the local address to connect from (default: the kernel's choice)
    _conn: http.client.HTTPConnection = field(init=False)
    _last_used: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        source = (self.source, 0) if self.source else None
        self._conn = http.client.HTTPConnection(
            self.host, self.port, timeout=self.timeout, source_address=source
        )

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: Iterable[memoryview | bytes] = (),
        length: int = 0,
    ) -> Response:
        """Send a request whose body is `body`'s pieces (`length` bytes in all); read the answer."""
        conn = self._conn
        if conn.sock is not None and time.monotonic() - self._last_used > self.idle_limit:
            conn.close()
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if length or method in ("POST", "PATCH", "PUT"):
                conn.putheader("Content-Length", str(length))
            conn.endheaders()
            try:
                for piece in body:
                    conn.sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered before reading the whole body: read its answer
            answer = conn.getresponse()
            data = answer.read()
        except BaseException:
            conn.close()
            raise
        self._last_used = time.monotonic()
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, data)

    def close(self) -> None:
        self._conn.close()


def expect(response: Response, statuses: tuple[int, ...], what: str) -> Response:
    if response.status not in statuses:
        raise RequestFailed(f"{what}: HTTP {response.status} {response.body[:200]!r}")
    return response


# -- the seed API -------------------------------------------------------------------------------


def seed_post(conn: Connection, payload: Payload) -> str:
    """POST /upload with the file as multipart field `file`, streamed; returns the session id."""
    boundary = "bench-" + secrets.token_hex(12)
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{payload.filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    response = conn.request(
        "POST",
        "/upload",
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        chain([head], payload.views(0, payload.size), [tail]),
        len(head) + payload.size + len(tail),
    )
    if response.status in (404, 405):
        raise Unsupported(f"POST /upload answered {response.status}")
    return expect(response, (201,), "POST /upload").json()["sessionID"]


def seed_status(conn: Connection, session_id: str) -> dict[str, Any]:
    response = conn.request("GET", f"/upload/status?sessionID={session_id}")
    return expect(response, (200,), "GET /upload/status").json()


def wait_completed(
    conn: Connection, session_id: str, timeout: float, interval: float = 0.02
) -> dict[str, Any]:
    """Poll the status until the session is completed; fail on a final state or the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        status = seed_status(conn, session_id)
        if status.get("completed"):
            return status
        if status.get("state") in ("failed", "terminated", "expired"):
            raise RequestFailed(f"session {session_id} is {status['state']}: {status.get('error')}")
        if time.monotonic() > deadline:
            raise RequestFailed(
                f"session {session_id} not completed after {timeout:.0f}s: {status}"
            )
        time.sleep(interval)


# -- tus 1.0 ------------------------------------------------------------------------------------


def tus_create(conn: Connection, endpoint: str, size: int, filename: str) -> str:
    """POST the creation request; returns the upload's path (from Location)."""
    encoded = base64.b64encode(filename.encode()).decode()
    response = conn.request(
        "POST",
        endpoint,
        {**TUS, "Upload-Length": str(size), "Upload-Metadata": f"filename {encoded}"},
    )
    if response.status in (404, 405):
        raise Unsupported(f"POST {endpoint} answered {response.status}")
    location = expect(response, (201,), f"POST {endpoint}").headers.get("location")
    if not location:
        raise RequestFailed(f"POST {endpoint}: 201 without Location")
    return urlsplit(location).path


def tus_patch(conn: Connection, location: str, payload: Payload, offset: int, size: int) -> int:
    """PATCH payload[offset:offset + size]; returns the server's new Upload-Offset."""
    response = conn.request(
        "PATCH",
        location,
        {
            **TUS,
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
        },
        payload.views(offset, offset + size),
        size,
    )
    expect(response, (204,), f"PATCH {location}")
    try:
        return int(response.headers["upload-offset"])
    except (KeyError, ValueError):
        raise RequestFailed(f"PATCH {location}: 204 without a valid Upload-Offset") from None


def tus_head(conn: Connection, location: str) -> int:
    response = expect(conn.request("HEAD", location, dict(TUS)), (200,), f"HEAD {location}")
    return int(response.headers.get("upload-offset", "-1"))


@dataclass
class TusTimings:
    location: str
    create_seconds: float
    patch_seconds: list[float]


def tus_upload(
    conn: Connection,
    endpoint: str,
    payload: Payload,
    patch_size: int,
    on_created: Callable[[str], None] | None = None,
) -> TusTimings:
    """Create an upload and PATCH it whole. Like any tus client, a PATCH the server ended early
    (204 with a smaller offset) is followed by one from the offset the server reported."""
    start = time.perf_counter()
    location = tus_create(conn, endpoint, payload.size, payload.filename)
    timings = TusTimings(location, time.perf_counter() - start, [])
    if on_created is not None:
        on_created(location)
    offset = stalls = 0
    while offset < payload.size:
        start = time.perf_counter()
        new_offset = tus_patch(
            conn, location, payload, offset, min(patch_size, payload.size - offset)
        )
        timings.patch_seconds.append(time.perf_counter() - start)
        if not offset < new_offset <= payload.size:
            stalls += 1
            if stalls > 3 or new_offset > payload.size or new_offset < 0:
                raise RequestFailed(f"PATCH {location} at {offset}: server offset {new_offset}")
        offset = new_offset
    return timings
