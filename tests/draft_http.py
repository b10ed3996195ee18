"""A small raw-HTTP client of the IETF draft (Resumable Uploads for HTTP) for the tests: every
header is explicit, as the draft's examples write them."""

from __future__ import annotations

import http.client
import json
import socket

import requests
import urllib3.connection

PARTIAL = "application/partial-upload"


class InterimSkippingResponse(http.client.HTTPResponse):
    """http.client reads a 104 as the final answer (it skips only 100 Continue): skip every
    informational answer, keeping the statuses and headers in `interim`, as clients of the draft
    do."""

    def _read_status(self):  # type: ignore[override]
        self.interim = getattr(self, "interim", [])
        while True:
            version, status, reason = super()._read_status()
            if not 100 <= status < 200 or status == 101:
                return version, status, reason
            self.interim.append((status, dict(http.client.parse_headers(self.fp))))


# requests (urllib3) builds its responses with http.client's, from this attribute
urllib3.connection.HTTPConnection.response_class = InterimSkippingResponse


def interop(version: int = 8) -> dict[str, str]:
    return {"Upload-Draft-Interop-Version": str(version)}


class Draft:
    def __init__(self, base: str, path: str = "/files/", version: int = 8) -> None:
        self.endpoint = base + path
        self.version = version
        self.http = requests.Session()

    def headers(self, **extra: str) -> dict[str, str]:
        return {**interop(self.version), **extra}

    def create(
        self, data: bytes = b"", *, complete: bool, headers: dict | None = None
    ) -> requests.Response:
        h = self.headers(**{"Upload-Complete": "?1" if complete else "?0"})
        h.update(headers or {})
        return self.http.post(self.endpoint, headers=h, data=data, timeout=60)

    def new(self, length: int | None = None, **headers: str) -> str:
        extra = {"Upload-Length": str(length)} if length is not None else {}
        response = self.create(complete=False, headers={**extra, **headers})
        assert response.status_code == 201, response.text
        return response.headers["Location"]

    def head(self, url: str) -> requests.Response:
        return self.http.head(url, headers=self.headers(), timeout=30)

    def append(
        self, url: str, offset: int, data: bytes, *, complete: bool, headers: dict | None = None
    ) -> requests.Response:
        h = self.headers(
            **{
                "Upload-Offset": str(offset),
                "Upload-Complete": "?1" if complete else "?0",
                "Content-Type": PARTIAL,
            }
        )
        h.update(headers or {})
        return self.http.patch(url, headers=h, data=data, timeout=120)

    def cancel(self, url: str) -> requests.Response:
        return self.http.delete(url, headers=self.headers(), timeout=30)


def problem(response: requests.Response) -> dict:
    assert response.headers["Content-Type"].startswith("application/problem+json"), response.text
    return json.loads(response.content)


def read_interim(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str]]:
    """Read one response head (status, headers by lower-case name) off a raw socket."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    fields = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return status, fields


def send_head(server, method: str, path: str, fields: dict) -> socket.socket:
    """Open a connection to `server` and send only a request's head: its body, and when to send
    it, are the caller's (a test reads the 104 off the socket first)."""
    sock = socket.create_connection((server.host, server.port), timeout=30)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {server.host}:{server.port}"]
    lines += [f"{name}: {value}" for name, value in fields.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def creation_head(
    server,
    length: int | None,
    *,
    complete: bool = True,
    version: str = "8",
    extra: dict | None = None,
    method: str = "POST",
) -> socket.socket:
    """A creation's head on a raw socket (`length`: its Content-Length, None for none)."""
    fields: dict = {"Upload-Complete": "?1" if complete else "?0"}
    fields["Upload-Draft-Interop-Version"] = version
    if length is not None:
        fields["Content-Length"] = length
    return send_head(server, method, "/files/", {**fields, **(extra or {})})


def append_head(server, url: str, offset: int, length: int, *, complete: bool) -> socket.socket:
    """An append's head on a raw socket."""
    fields = {
        "Content-Length": length,
        "Upload-Offset": offset,
        "Upload-Complete": "?1" if complete else "?0",
        "Content-Type": PARTIAL,
        "Upload-Draft-Interop-Version": "8",
    }
    return send_head(server, "PATCH", "/" + url.split("/", 3)[3], fields)
