"""tusd's HTTP hooks (`--hook-format tusd`): the request body tusd sends and the answers it obeys,
so that receivers written for tusd (or @tus/server's tusd-style hooks) work unchanged.

    POST <hook_url>   Content-Type: application/json
    {"Type": "pre-create",
     "Event": {"Upload": {"ID", "Size", "SizeIsDeferred", "Offset", "MetaData", "IsPartial",
                          "IsFinal", "PartialUploads", "Storage"},
               "HTTPRequest": {"Method", "URI", "RemoteAddr", "Header": {name: [values]}}}}

An answer (2xx, a JSON object; keys matched case-insensitively, as Go's decoder does) may hold
`HTTPResponse` {`StatusCode`, `Body`, `Header`}, `RejectUpload` (pre-create), `ChangeFileInfo`
{`ID`, `MetaData`} (pre-create), `RejectTermination` (pre-terminate) and `StopUpload`
(post-receive). `Headers` is taken for `Header` too, as tusd's own example receiver writes it.

The HTTP request that caused an event is known to the hooks through `RequestContext` (a context
variable set by the `HookRequests` middleware), so the service needs no HTTP in its signatures; an
event raised by a writer (post-finish, post-receive, post-terminate) carries the request fields
empty, as no request is behind it. The same context collects the `HTTPResponse` changes of
pre-create and pre-finish answers and merges them into the response at its end, as tusd does.
"""

from __future__ import annotations

import base64
import contextvars
import dataclasses
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import falcon

from . import errors
from .sessions.record import Session

MAX_ANSWER = 64 * 1024
_New = TypeVar("_New")


@dataclass
class RequestContext:
    """What the hooks know of the request being served."""

    method: str = ""
    uri: str = ""
    remote_addr: str = ""
    header: dict[str, list[str]] = field(default_factory=dict)
    changes: list[dict[str, Any]] = field(default_factory=list)  # HTTPResponse to merge
    created: set[str] = field(default_factory=set)  # upload ids created by this request

    def http_request(self) -> dict[str, Any]:
        return {
            "Method": self.method,
            "URI": self.uri,
            "RemoteAddr": self.remote_addr,
            "Header": self.header,
        }


_CURRENT: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "upload_server_hook_request", default=None
)


def current() -> RequestContext:
    """The request being served, or an empty one (an event from a writer or the sweeper)."""
    return _CURRENT.get() or RequestContext()


def in_request() -> bool:
    return _CURRENT.get() is not None


class HookRequests:
    """Falcon middleware: makes the request known to the hooks, and merges into a successful
    response what pre-create and pre-finish answers asked for."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        header: dict[str, list[str]] = {}
        for name, value in req.headers.items():
            header.setdefault(name.title(), []).append(value)
        uri = req.relative_uri
        remote = f"{req.env.get('REMOTE_ADDR', '')}:{req.env.get('REMOTE_PORT', '')}"
        req.context.hook_token = _CURRENT.set(
            RequestContext(req.method, uri, remote.rstrip(":"), header)
        )

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, succeeded: bool
    ) -> None:
        token = getattr(req.context, "hook_token", None)
        if token is None:
            return
        context = _CURRENT.get()
        _CURRENT.reset(token)
        if context is None or not succeeded or not resp.status_code < 300:
            return
        for change in context.changes:
            apply(resp, change)


def apply(resp: falcon.Response, http_response: dict[str, Any]) -> None:
    """tusd's `HTTPResponse.writeTo`: a status code and body when given, headers added."""
    status, body, headers = _response_parts(http_response)
    for name, value in headers.items():
        resp.set_header(name, value)
    if status:
        resp.status = status
    if body:
        resp.data = body.encode()
        if "content-type" not in {n.lower() for n in headers}:
            resp.content_type = "text/plain; charset=utf-8"


def _response_parts(http_response: dict[str, Any]) -> tuple[int, str, dict[str, str]]:
    status = _get(http_response, "StatusCode")
    body = _get(http_response, "Body")
    headers = _get(http_response, "Header") or _get(http_response, "Headers") or {}
    if not isinstance(headers, dict):
        headers = {}
    valid_status = status if isinstance(status, int) and 100 <= status <= 599 else 0
    if valid_status == 500:
        valid_status = 502  # never a 500: what went wrong is the hook receiver's
    return (
        valid_status,
        body if isinstance(body, str) else "",
        {str(k): str(v) for k, v in headers.items() if str(k).strip()},
    )


class HookAnswered(errors.UploadError):
    """A refusal shaped by a hook's `HTTPResponse`: its status and headers; its body as the
    error's message, or verbatim when the hook gave the body a Content-Type of its own."""

    def __init__(self, code: str, message: str, status: int, http_response: dict[str, Any]):
        hook_status, body, headers = _response_parts(http_response)
        super().__init__(
            body.strip() or message, code=code, status=hook_status or status, headers=headers
        )
        self.raw = body if "content-type" in {n.lower() for n in headers} else None

    def body(self) -> bytes:
        if self.raw is not None:
            return self.raw.encode()
        return super().body()


@dataclass
class Answer:
    """A receiver's answer, read as tusd reads it."""

    http_response: dict[str, Any]
    reject_upload: bool = False
    reject_termination: bool = False
    stop_upload: bool = False
    change_id: str | None = None
    change_metadata: dict[str, str] | None = None

    @classmethod
    def parse(cls, raw: bytes) -> Answer:
        """The answer, or ValueError when it is not one (tusd counts that a failed hook)."""
        if len(raw) > MAX_ANSWER:
            raise ValueError(f"the hook's answer is longer than {MAX_ANSWER} bytes")
        data = json.loads(raw) if raw.strip() else {}
        if not isinstance(data, dict):
            raise ValueError("the hook's answer is not a JSON object")
        http_response = _get(data, "HTTPResponse") or {}
        changes = _get(data, "ChangeFileInfo") or {}
        if not isinstance(http_response, dict) or not isinstance(changes, dict):
            raise ValueError("HTTPResponse and ChangeFileInfo must be JSON objects")
        new_id = _get(changes, "ID")
        metadata = _get(changes, "MetaData")
        if new_id is not None and not isinstance(new_id, str):
            raise ValueError("ChangeFileInfo.ID must be a string")
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            raise ValueError("ChangeFileInfo.MetaData must map names to strings")
        return cls(
            http_response=http_response,
            reject_upload=_get(data, "RejectUpload") is True,
            reject_termination=_get(data, "RejectTermination") is True,
            stop_upload=_get(data, "StopUpload") is True,
            change_id=new_id or None,
            change_metadata=metadata,
        )


def _get(data: dict[str, Any], key: str) -> Any:
    """`data[key]`, with the key matched case-insensitively (as Go's JSON decoder matches)."""
    if key in data:
        return data[key]
    lowered = key.lower()
    return next((v for k, v in data.items() if isinstance(k, str) and k.lower() == lowered), None)


def request_body(hook_type: str, upload: dict[str, Any]) -> bytes:
    """What tusd POSTs for a hook: its type, the upload and the request behind it."""
    event = {"Upload": upload, "HTTPRequest": current().http_request()}
    return json.dumps({"Type": hook_type, "Event": event}).encode()


def new_file_info(upload: dict[str, Any]) -> dict[str, Any]:
    """A FileInfo of an upload not created yet (pre-create: no ID, as in tusd)."""
    size = upload.get("totalBytes")
    return {
        "ID": "",
        "Size": size or 0,
        "SizeIsDeferred": size is None,
        "Offset": 0,
        "MetaData": _metadata(
            upload.get("metadata"), upload.get("filename"), upload.get("filetype")
        ),
        "IsPartial": upload.get("concat") == "partial",
        "IsFinal": upload.get("concat") == "final",
        "PartialUploads": list(upload.get("parts") or []) or None,
        "Storage": None,
    }


def file_info(session: Session, upload_dir: Path) -> dict[str, Any]:
    """tusd's FileInfo of a session. Storage says where a completed upload's file is."""
    storage: dict[str, str] = {"Type": "filestore"}
    location = session.location
    if location and location.startswith("s3://"):
        bucket, _, key = location.removeprefix("s3://").partition("/")
        storage = {"Type": "s3store", "Bucket": bucket, "Key": key}
    elif location:
        storage["Path"] = str(upload_dir.absolute() / location)
    return {
        "ID": session.id,
        "Size": session.total_bytes or 0,
        "SizeIsDeferred": session.total_bytes is None,
        "Offset": session.bytes_written,
        "MetaData": _metadata(session.metadata, session.filename, session.filetype),
        "IsPartial": session.concat == "partial",
        "IsFinal": session.concat == "final",
        "PartialUploads": list(session.parts) or None,
        "Storage": storage,
    }


def _metadata(
    metadata: dict[str, str | None] | None, filename: str | None, filetype: str | None
) -> dict[str, str]:
    """tusd's MetaData is string to string: a key sent without a value is an empty string. A
    seed upload has no metadata: its filename and type are given under tus's usual keys."""
    if metadata:
        return {k: v or "" for k, v in metadata.items()}
    named = {"filename": filename or "", "filetype": filetype or ""}
    return {k: v for k, v in named.items() if v}


def metadata_header(metadata: dict[str, str]) -> str | None:
    """Upload-Metadata for metadata a hook set: `key base64(value)` pairs (a bare key if empty)."""
    pairs = [
        f"{key} {base64.b64encode(value.encode()).decode()}" if value else key
        for key, value in metadata.items()
    ]
    return ",".join(pairs) or None


def with_metadata(new: _New, metadata: dict[str, str]) -> _New:
    """A pre-create hook's ChangeFileInfo.MetaData replaces the new upload's metadata (and the
    name and type it gives the stored file), as in tusd. `new` is a `service.NewUpload`."""
    return dataclasses.replace(
        new,  # type: ignore[type-var]
        metadata=dict(metadata),
        metadata_header=metadata_header(metadata),
        filename=metadata.get("filename") or metadata.get("name") or new.filename,  # type: ignore[attr-defined]
        filetype=metadata.get("filetype") or metadata.get("type") or new.filetype,  # type: ignore[attr-defined]
    )


class IdClaims:
    """Upload ids chosen by pre-create hooks, held from the hook's answer until their sessions
    are saved (or fail): an id must be unused, also by a creation still in flight."""

    def __init__(self, in_use: Callable[[str], bool]) -> None:
        self.in_use = in_use
        self._claimed: set[str] = set()
        self._lock = threading.Lock()

    def take(self, upload_id: str) -> None:
        with self._lock:
            if upload_id in self._claimed or self.in_use(upload_id):
                raise errors.Conflict(
                    f"the pre-create hook chose the upload id {upload_id!r}, which is taken",
                    code="upload_id_taken",
                )
            self._claimed.add(upload_id)

    def release(self, upload_id: str) -> None:
        with self._lock:
            self._claimed.discard(upload_id)
