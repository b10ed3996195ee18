"""A small round-robin HTTP proxy: each request goes to the next node, as a PaaS router does.

It stands in front of a local cluster (`python -m benchmarks.localcluster`) and the cluster benchmark,
so consecutive requests of one client, even on one keep-alive connection, land on different nodes.
Bodies are streamed both ways in blocks, never held whole. The client's Host header is passed on,
so the URLs the nodes build (tus `Location`) point at the proxy.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import logging
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("upload_server.proxy")

BLOCK = 256 * 1024
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}


class RoundRobinProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], backends: Sequence[tuple[str, int]]) -> None:
        super().__init__(address, _Handler)
        self.backends = list(backends)
        self._next = itertools.cycle(range(len(self.backends)))
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def pick(self) -> tuple[str, int]:
        with self._lock:
            return self.backends[next(self._next)]

    def start(self) -> RoundRobinProxy:
        threading.Thread(target=self.serve_forever, name="proxy", daemon=True).start()
        return self


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RoundRobinProxy

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def _relay(self) -> None:
        host, port = self.server.pick()
        upstream = http.client.HTTPConnection(host, port, timeout=300)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    upstream.putheader(name, value)
            length = self.headers.get("Content-Length")
            chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            if length is not None:
                upstream.putheader("Content-Length", length)
            elif chunked:
                upstream.putheader("Transfer-Encoding", "chunked")
            upstream.endheaders()
            if length is not None:
                _copy(self.rfile, upstream.send, int(length))
            elif chunked:
                self._relay_chunks(upstream)
            answer = upstream.getresponse()
        except OSError as exc:
            upstream.close()
            self._fail(f"node {host}:{port} unreachable: {exc}")
            return
        with contextlib.closing(upstream):
            self.send_response_only(answer.status, answer.reason)
            for name, value in answer.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            if answer.length is None:  # no length (nor 204, 304, HEAD): the body ends at close
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                while block := answer.read(BLOCK):
                    self.wfile.write(block)

    def _relay_chunks(self, upstream: http.client.HTTPConnection) -> None:
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                upstream.send(b"0\r\n\r\n")
                return
            upstream.send(f"{size:x}\r\n".encode())
            _copy(self.rfile, upstream.send, size)
            upstream.send(b"\r\n")
            self.rfile.readline()

    def _fail(self, message: str) -> None:
        body = json.dumps({"error": {"code": "bad_gateway", "message": message}}).encode()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.send_response(502)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PATCH = do_PUT = do_DELETE = do_OPTIONS = _relay


def _copy(source: Any, send: Any, length: int) -> None:
    while length > 0:
        block = source.read(min(BLOCK, length))
        if not block:
            raise ConnectionError("the client closed the connection mid-body")
        send(block)
        length -= len(block)
