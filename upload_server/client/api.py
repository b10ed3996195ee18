"""The server as the client sees it: where it is, how to authenticate, and its seed API.

Every request has a timeout, so a network that drops silently becomes an error the caller can
retry, never a hang. Errors come in two kinds a caller can act on differently: `Unreachable` (no
answer: retry later) and `ServerError` (the server answered no: its JSON error's code and message).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any

import requests

from ..protocol import tus

TIMEOUT = (10.0, 120.0)  # connect, read: a PATCH may wait on a rate-limited writer


class Unreachable(Exception):
    """No answer from the server: refused, timed out, or the connection dropped."""


class ServerError(Exception):
    """The server answered with an error: `status`, its `code` and `message`."""

    def __init__(self, status: int, code: str, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.offset = offset

    @classmethod
    def from_response(cls, response: requests.Response) -> ServerError:
        try:
            error = response.json().get("error") or {}
        except (ValueError, AttributeError):
            error = {}
        message = error.get("message") or f"the server answered {response.status_code}"
        if response.status_code in (401, 403) and not error.get("message"):
            message = "the server wants an access token: pass --token or set UPLOAD_CLIENT_TOKEN"
        return cls(
            response.status_code,
            error.get("code") or f"http_{response.status_code}",
            message,
            error.get("offset"),
        )

    def __str__(self) -> str:
        return f"{self.message} ({self.status} {self.code})"


@dataclass(frozen=True)
class Server:
    """An upload_server: its base URL (`http://host:port`), tus path and optional bearer token."""

    base: str
    tus_path: str = "/files/"
    token: str | None = None

    @property
    def endpoint(self) -> str:
        return self.base + self.tus_path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def upload_url(self, upload_id: str) -> str:
        return self.endpoint + upload_id

    def request(
        self, http: requests.Session, method: str, url: str, **kwargs: Any
    ) -> requests.Response:
        """One request with this server's headers and a timeout; no answer is `Unreachable`."""
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        try:
            return http.request(method, url, headers=headers, timeout=TIMEOUT, **kwargs)
        except requests.RequestException as exc:
            raise Unreachable(f"{self.base} did not answer: {_reason(exc)}") from None

    def probe(self, http: requests.Session) -> None:
        """Check that the tus endpoint answers at all (any status will do)."""
        self.request(http, "OPTIONS", self.endpoint)

    def seed(self, http: requests.Session, method: str, action: str, upload_id: str) -> dict:
        """Call `/upload/<action>?sessionID=<id>` (status, pause, resume, terminate)."""
        url = f"{self.base}/upload/{action}?" + urllib.parse.urlencode({"sessionID": upload_id})
        response = self.request(http, method, url)
        if not response.ok:
            raise ServerError.from_response(response)
        return response.json()

    def head(self, http: requests.Session, upload_id: str) -> requests.Response:
        """tus HEAD: the upload's offset, length, metadata and (once complete) Repr-Digest."""
        response = self.request(
            http, "HEAD", self.upload_url(upload_id), headers={"Tus-Resumable": tus.VERSION}
        )
        if response.status_code in (404, 410):  # a HEAD answer has no body to explain it
            raise ServerError(response.status_code, "unknown_upload", f"no upload {upload_id}")
        if not response.ok:
            raise ServerError.from_response(response)
        return response


def resolve(target: str, server: Server) -> tuple[Server, str]:
    """An upload id, or an upload URL (`http://host/files/<id>`) whose server then wins."""
    if "://" not in target:
        if not target or "/" in target:
            raise ValueError(f"not an upload id or URL: {target!r}")
        return server, target
    parts = urllib.parse.urlsplit(target)
    path, _, upload_id = parts.path.rstrip("/").rpartition("/")
    if parts.scheme not in ("http", "https") or not parts.netloc or not upload_id:
        raise ValueError(f"not an upload URL: {target!r}")
    return Server(f"{parts.scheme}://{parts.netloc}", path + "/", server.token), upload_id


def _reason(exc: requests.RequestException) -> str:
    text = str(exc)
    for marker in ("Connection refused", "timed out", "Name or service not known", "reset"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__
