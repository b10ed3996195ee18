"""A small raw-HTTP tus client for the protocol tests: every header is explicit."""

from __future__ import annotations

import base64
import hashlib

import requests

TUS = {"Tus-Resumable": "1.0.0"}
OCTET = "application/offset+octet-stream"


def metadata(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


class Tus:
    def __init__(self, base: str, path: str = "/files/") -> None:
        self.endpoint = base + path
        self.http = requests.Session()

    def create(
        self,
        length: int | None = None,
        *,
        headers: dict | None = None,
        data: bytes | None = None,
        **meta: str,
    ) -> requests.Response:
        h = {**TUS}
        if length is not None:
            h["Upload-Length"] = str(length)
        if meta:
            h["Upload-Metadata"] = metadata(**meta)
        if data is not None:
            h["Content-Type"] = OCTET
        h.update(headers or {})
        return self.http.post(self.endpoint, headers=h, data=data, timeout=60)

    def new(self, length: int | None, **meta: str) -> str:
        response = self.create(length, **meta)
        assert response.status_code == 201, response.text
        return response.headers["Location"]

    def head(self, url: str, headers: dict | None = None) -> requests.Response:
        return self.http.head(url, headers={**TUS, **(headers or {})}, timeout=30)

    def patch(
        self,
        url: str,
        offset: int,
        data: bytes,
        headers: dict | None = None,
    ) -> requests.Response:
        h = {**TUS, "Upload-Offset": str(offset), "Content-Type": OCTET, **(headers or {})}
        return self.http.patch(url, headers=h, data=data, timeout=120)

    def delete(self, url: str) -> requests.Response:
        return self.http.delete(url, headers=TUS, timeout=30)

    def upload(self, data: bytes, chunk: int = 1024 * 1024, **meta: str) -> str:
        url = self.new(len(data), **meta)
        offset = 0
        while offset < len(data):
            response = self.patch(url, offset, data[offset : offset + chunk])
            assert response.status_code == 204, response.text
            offset = int(response.headers["Upload-Offset"])
        return url


def checksum(algorithm: str, data: bytes) -> str:
    return f"{algorithm} {base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"
