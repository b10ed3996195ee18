"""tus 1.0.0 at `--tus-path` (default /files/): core protocol and every extension this stack allows.

    OPTIONS /files/        capabilities
    POST    /files/        creation, creation-with-upload, creation-defer-length, concatenation
    HEAD    /files/{id}    offset, length, metadata (Cache-Control: no-store)
    PATCH   /files/{id}    append at the current offset, with an optional Upload-Checksum
    DELETE  /files/{id}    termination
    GET     /files/{id}    download a completed upload (Range supported)

A PATCH is answered 204 only once its bytes are in the upload's data. Two PATCHes on one upload never
interleave: the second is refused with 423 at once. waitress hands a request to the app only after its
whole body has arrived; a request cut off mid-body reaches these resources later, replayed by
`cut_bodies` as the shorter request it is, and HEAD and PATCH wait for that first. checksum-trailer
is not offered: WSGI gives an app no access to HTTP trailers.
"""

from __future__ import annotations

import base64
import contextlib
import re
import urllib.parse
from typing import BinaryIO

import falcon

from .. import errors
from ..auth import Principal
from ..cut_bodies import CutBodies
from ..filenames import sanitize
from ..locks import Locks
from ..protocol import ranges, tus
from ..service import NewUpload, SessionService
from ..sessions import lifecycle
from ..sessions import record as states
from ..sessions.record import Session
from .bodies import empty_body, open_body

_MIME = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"
)
_DIGEST = re.compile(r"sha-256=:([A-Za-z0-9+/=]+):")
_STREAM_BLOCK = 1024 * 1024
COMPLETE_AGAIN_WAIT = 10.0  # seconds a HEAD waits for a PATCH of the same upload to finish


def _header_error(exc: tus.TusHeaderError) -> errors.BadRequest:
    return errors.BadRequest(str(exc), code="bad_header")


def repr_digest(sha256_hex: str) -> str:
    """RFC 9530 Repr-Digest of a completed upload."""
    return f"sha-256=:{base64.b64encode(bytes.fromhex(sha256_hex)).decode()}:"


class _TusResource:
    def __init__(self, service: SessionService, locks: Locks) -> None:
        self.service = service
        self.locks = locks
        self.base_path = service.config.tus_path

    def _capabilities(self, resp: falcon.Response) -> None:
        resp.status = falcon.HTTP_204
        resp.set_header("Tus-Version", tus.VERSION)
        resp.set_header("Tus-Extension", ",".join(tus.EXTENSIONS))
        resp.set_header("Tus-Max-Size", str(self.service.config.max_upload_size))
        resp.set_header("Tus-Checksum-Algorithm", ",".join(tus.CHECKSUM_ALGORITHMS))

    def _location(self, req: falcon.Request, session_id: str) -> str:
        return f"{req.prefix}{self.base_path}{session_id}"

    def _expiry_headers(self, resp: falcon.Response, session: Session) -> None:
        if session.expires_at is not None and not session.is_final:
            resp.set_header("Upload-Expires", tus.http_date(session.expires_at))


class TusCollection(_TusResource):
    """/files/: capabilities and creation."""

    def on_options(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._capabilities(resp)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        config = self.service.config
        try:
            length = tus.parse_integer("Upload-Length", req.get_header("Upload-Length"))
            deferred = tus.parse_defer_length(req.get_header("Upload-Defer-Length"))
            header = req.get_header("Upload-Metadata")
            metadata = tus.parse_metadata(header, config.max_metadata_size)
            concat = tus.parse_concat(req.get_header("Upload-Concat"), self.base_path)
            checksum = tus.parse_checksum(req.get_header("Upload-Checksum"))
        except tus.TusHeaderError as exc:
            raise _header_error(exc) from None
        final = concat is not None and concat.kind == "final"
        if final and (length is not None or deferred):
            raise errors.BadRequest("a final upload takes no Upload-Length", code="bad_header")
        if not final and (length is None) == (not deferred):
            raise errors.BadRequest(
                "send exactly one of Upload-Length and Upload-Defer-Length: 1", code="bad_header"
            )
        parts = self._final_parts(concat.parts, req.context.principal) if final else []
        if final:
            length = sum(p.total_bytes or 0 for p in parts)
        if length is not None and length > config.max_upload_size:
            raise errors.TooLarge(
                f"Upload-Length {length} is larger than Tus-Max-Size {config.max_upload_size}",
                code="upload_too_large",
            )
        body_length = req.content_length or 0
        if body_length:
            self._check_creation_body(req, final, length, body_length)
        session = self.service.create(
            NewUpload(
                protocol=states.TUS,
                filename=metadata.get("filename") or metadata.get("name"),
                total_bytes=length,
                filetype=metadata.get("filetype") or metadata.get("type"),
                metadata=metadata,
                metadata_header=header,
                expected_sha256=declared_sha256(req, metadata),
                principal=req.context.principal,
                client=req.context.client,
                concat=concat.kind if concat else None,
                parts=tuple(p.id for p in parts),
            )
        )
        try:
            if final:
                session = self.service.concat(session)
            elif body_length or length == 0:
                session = self._append_body(req, session, 0, checksum)
        except Exception:
            # The client learns no Location, so it will create again: leave no orphan.
            with contextlib.suppress(errors.UploadError, lifecycle.Refusal):
                self.service.control(session, lifecycle.TERMINATE, completed_too=True)
            raise
        resp.status = falcon.HTTP_201
        resp.set_header("Location", self._location(req, session.id))
        resp.set_header("Upload-Offset", str(session.bytes_written))
        self._expiry_headers(resp, session)

    @staticmethod
    def _check_creation_body(
        req: falcon.Request, final: bool, length: int | None, body_length: int
    ) -> None:
        """Refuse a creation-with-upload body before anything is created."""
        if final:
            raise errors.BadRequest("a final upload takes no body", code="final_upload_body")
        if not _is_offset_stream(req):
            raise errors.UnsupportedMediaType(
                f"a body sent with creation needs Content-Type {tus.OFFSET_OCTET_STREAM}",
                code="bad_content_type",
            )
        if length is not None and body_length > length:
            raise errors.TooLarge(
                f"the body of {body_length} bytes is longer than Upload-Length {length}",
                code="exceeds_length",
            )

    def _final_parts(self, part_ids: tuple[str, ...], principal: Principal | None) -> list[Session]:
        parts = []
        for part_id in part_ids:
            try:
                part = self.service.get(part_id, principal)
            except errors.NotFound:
                raise errors.BadRequest(
                    f"Upload-Concat names an unknown upload {part_id!r}", code="unknown_part"
                ) from None
            if part.concat != "partial":
                raise errors.BadRequest(
                    f"upload {part_id} is not a partial upload", code="not_partial"
                )
            if part.state != states.COMPLETED:
                raise errors.BadRequest(
                    f"partial upload {part_id} is not complete", code="partial_incomplete"
                )
            parts.append(part)
        return parts

    def _append_body(
        self,
        req: falcon.Request,
        session: Session,
        offset: int,
        checksum: tuple[str, bytes] | None,
    ) -> Session:
        limit = self.service.config.max_upload_size
        with open_body(req, self.service, limit=limit) as body:
            return self.service.append(session, body, offset, checksum)


class TusUpload(_TusResource):
    """/files/{upload_id}: one upload. HEAD and PATCH first wait for a cut request's prefix of
    the same upload that is still being stored (`cut_bodies`), so a retry sees its own bytes."""

    def __init__(self, service: SessionService, locks: Locks, cut_bodies: CutBodies) -> None:
        super().__init__(service, locks)
        self.cut_bodies = cut_bodies

    def _session(self, req: falcon.Request, upload_id: str) -> Session:
        session = self.service.get(upload_id, req.context.principal)
        if session.state in lifecycle.ENDED:
            raise lifecycle.Refusal(session.state, f"upload {upload_id} was {session.state}")
        return session

    def on_options(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        self._capabilities(resp)

    def on_head(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        self.cut_bodies.wait(upload_id, req.env)
        session = self._session(req, upload_id)
        if lifecycle.completion_failed(session):
            session = self._complete_again(req, session)
        resp.set_header("Cache-Control", "no-store")
        resp.set_header("Upload-Offset", str(session.bytes_written))
        if session.total_bytes is None:
            resp.set_header("Upload-Defer-Length", "1")
        else:
            resp.set_header("Upload-Length", str(session.total_bytes))
        if session.metadata_header:
            resp.set_header("Upload-Metadata", session.metadata_header)
        if session.concat == "partial":
            resp.set_header("Upload-Concat", "partial")
        elif session.concat == "final":
            urls = " ".join(self._location(req, part) for part in session.parts)
            resp.set_header("Upload-Concat", f"final;{urls}")
        if session.sha256 and session.state == states.COMPLETED:
            resp.set_header("Repr-Digest", repr_digest(session.sha256))
        self._expiry_headers(resp, session)
        resp.status = falcon.HTTP_200

    def _complete_again(self, req: falcon.Request, session: Session) -> Session:
        """Complete an upload whose completion failed, as its client's empty PATCH at the end
        would: the client, seeing offset == length, would take it for done and send none. A
        completion that fails again is answered as that error (507 for a full disk), so the
        client retries instead of reporting a file the server never published."""
        with self.locks.hold(session.id, wait=COMPLETE_AGAIN_WAIT):
            session = self._session(req, session.id)
            if not lifecycle.completion_failed(session):
                return session
            try:
                return self.service.append(session, empty_body(self.service), session.bytes_written)
            except lifecycle.Refusal as refusal:
                if refusal.code != lifecycle.COMPLETED:  # a resume's drain got there first
                    raise
                return self._session(req, session.id)

    def on_patch(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        if not _is_offset_stream(req):
            raise errors.UnsupportedMediaType(
                f"PATCH needs Content-Type {tus.OFFSET_OCTET_STREAM}", code="bad_content_type"
            )
        try:
            offset = tus.parse_integer("Upload-Offset", req.get_header("Upload-Offset"))
            checksum = tus.parse_checksum(req.get_header("Upload-Checksum"))
            declared = tus.parse_integer("Upload-Length", req.get_header("Upload-Length"))
        except tus.TusHeaderError as exc:
            raise _header_error(exc) from None
        if offset is None:
            raise errors.BadRequest("PATCH needs an Upload-Offset header", code="bad_header")
        length = req.content_length or 0
        self.cut_bodies.wait(upload_id, req.env)
        with self.locks.hold(upload_id):
            session = self._session(req, upload_id)
            if not lifecycle.is_repeat_of_last_append(session, offset, length):
                lifecycle.check_append(
                    session,
                    offset,
                    length,
                    declared=declared,
                    max_size=self.service.config.max_upload_size,
                )
                limit = self.service.config.max_upload_size
                with open_body(req, self.service, limit=limit) as body:
                    session = self.service.append(session, body, offset, checksum, declared)
        resp.status = falcon.HTTP_204
        resp.set_header("Upload-Offset", str(session.bytes_written))
        self._expiry_headers(resp, session)

    def on_delete(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        session = self._session(req, upload_id)
        with self.locks.hold(upload_id, wait=30.0):
            self.service.control(session, "terminate", completed_too=True)
        resp.status = falcon.HTTP_204

    def on_get(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        session = self._session(req, upload_id)
        if session.state != states.COMPLETED:
            raise errors.Conflict(
                f"the upload is {session.state}; only a completed upload can be downloaded",
                code="not_complete",
                offset=session.bytes_written,
            )
        try:
            handle, size = self.service.storage.open_published(session.location, session.id)
        except FileNotFoundError:
            raise errors.NotFound(
                "the upload's file is no longer stored", code="file_gone"
            ) from None
        resp.set_header("Accept-Ranges", "bytes")
        resp.set_header("Content-Type", _content_type(session.filetype))
        resp.set_header("Content-Disposition", content_disposition(_download_name(session)))
        resp.set_header("X-Content-Type-Options", "nosniff")
        etag = f'"{session.sha256}"' if session.sha256 else None
        if etag:
            resp.set_header("Repr-Digest", repr_digest(session.sha256))
            resp.set_header("ETag", etag)
        if_range = req.get_header("If-Range")
        wanted = req.get_header("Range") if if_range is None or if_range == etag else None
        try:
            span = ranges.parse_range(wanted, size)
        except ranges.Unsatisfiable:
            handle.close()
            raise errors.UploadError(
                f"the range is outside the file's {size} bytes",
                code="range_not_satisfiable",
                status=416,
                headers={"Content-Range": f"bytes */{size}"},
            ) from None
        if span is None:
            resp.set_stream(handle, size)
            return
        start, end = span
        resp.status = falcon.HTTP_206
        resp.set_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        resp.set_stream(_Slice(handle, start, end), end - start)


class _Slice:
    """Part of a file, read in blocks: a Range download never holds the file in memory."""

    def __init__(self, handle: BinaryIO, start: int, end: int) -> None:
        handle.seek(start)
        self.handle = handle
        self.remaining = end - start

    def read(self, size: int = _STREAM_BLOCK) -> bytes:
        if self.remaining <= 0:
            return b""
        if size is None or size < 0:
            size = _STREAM_BLOCK
        data = self.handle.read(min(size, self.remaining, _STREAM_BLOCK))
        self.remaining -= len(data)
        return data

    def close(self) -> None:
        self.handle.close()


def _download_name(session: Session) -> str:
    """The client's filename; else the stored name, unless that is an object URL (s3://...)."""
    location = session.location or ""
    return session.filename or ("" if "://" in location else location) or session.id


def _is_offset_stream(req: falcon.Request) -> bool:
    return (req.content_type or "").split(";")[0].strip().lower() == tus.OFFSET_OCTET_STREAM


def _content_type(filetype: str | None) -> str:
    if filetype and _MIME.match(filetype):
        return filetype
    return "application/octet-stream"


def content_disposition(name: str) -> str:
    """`attachment` with an ASCII fallback and the exact UTF-8 name (RFC 6266)."""
    safe = sanitize(name)
    ascii_name = safe.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    quoted = urllib.parse.quote(safe, safe="")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quoted}"


def declared_sha256(req: falcon.Request, metadata: dict[str, str | None]) -> str | None:
    """The digest a client declares up front: Repr-Digest sha-256, or a `sha256` metadata key."""
    header = req.get_header("Repr-Digest") or req.get_header("Content-Digest")
    if header:
        match = _DIGEST.search(header)
        if match:
            try:
                raw = base64.b64decode(match.group(1), validate=True)
            except ValueError:
                raw = b""
            if len(raw) == 32:
                return raw.hex()
        raise errors.BadRequest("Repr-Digest needs a sha-256 value", code="bad_digest")
    value = (metadata.get("sha256") or "").strip().lower()
    if not value:
        return None
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise errors.BadRequest("the sha256 metadata must be 64 hex digits", code="bad_digest")
    return value
