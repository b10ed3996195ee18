"""The loopback ceiling: an HTTP server that reads request bodies and throws them away.

Run by `run.py` as its own process (`python sink.py`, which prints the port it listens on). One thread
per connection reads into one preallocated buffer with `recv_into`, so the only cost is the kernel's
copy out of the socket. It answers just enough of the seed API and tus for the benchmark's client:
POST /upload (a session that is complete at once), GET /upload/status, POST /files/, PATCH (the
offset after the body), HEAD, GET /healthz. Nothing is stored, so nothing can be verified.
"""

from __future__ import annotations

import itertools
import json
import socket
import sys
import threading

BUFFER = 1024 * 1024
_ids = itertools.count(1)


def _answer(status: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def respond(method: str, path: str, headers: dict[str, str], length: int) -> bytes:
    """The answer to one request whose body (`length` bytes) has been read."""
    tus = {"Tus-Resumable": "1.0.0"}
    if method == "POST" and path.startswith("/files"):
        return _answer("201 Created", {**tus, "Location": f"/files/sink{next(_ids)}"})
    if method == "PATCH" and path.startswith("/files/"):
        offset = int(headers.get("upload-offset", "0")) + length
        return _answer("204 No Content", {**tus, "Upload-Offset": str(offset)})
    if method == "HEAD" and path.startswith("/files/"):
        return _answer("200 OK", {**tus, "Upload-Offset": "0", "Cache-Control": "no-store"})
    if method == "POST" and path.startswith("/upload"):
        body = json.dumps({"sessionID": f"sink{next(_ids)}"}).encode()
        return _answer("201 Created", {"Content-Type": "application/json"}, body)
    if method == "GET" and path.startswith("/upload/status"):
        body = json.dumps({"completed": True, "state": "completed"}).encode()
        return _answer("200 OK", {"Content-Type": "application/json"}, body)
    if method == "GET" and path == "/healthz":
        return _answer("200 OK", {})
    return _answer("404 Not Found", {})


def serve(sock: socket.socket) -> None:
    """Serve one keep-alive connection until the client closes it."""
    buffer = bytearray(BUFFER)
    view = memoryview(buffer)
    filled = 0  # bytes of the next request already in `buffer`
    with sock:
        while True:
            end = buffer.find(b"\r\n\r\n", 0, filled)
            while end < 0:
                if filled == BUFFER:
                    return  # headers larger than the buffer: not our client
                received = sock.recv_into(view[filled:])
                if not received:
                    return
                filled += received
                end = buffer.find(b"\r\n\r\n", 0, filled)
            request_line, *header_lines = bytes(view[:end]).decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            have = filled - (end + 4)
            if have >= length:  # the whole body (and maybe the next request) is here already
                rest = end + 4 + length
                buffer[: filled - rest] = bytes(view[rest:filled])
                filled -= rest
            else:
                remaining = length - have
                while remaining:
                    received = sock.recv_into(view, min(remaining, BUFFER))
                    if not received:
                        return
                    remaining -= received
                filled = 0
            sock.sendall(respond(method, path, headers, length))


def main() -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    print(listener.getsockname()[1], flush=True)
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
