"""A TCP proxy on loopback that counts what clients send and cuts connections as a bad network would.

It stands between a real client and the server so a test can count the bytes a client sends after
resuming, and can drop the network in the middle of an upload. Two ways to cut:

- `cut_at = n`: once, when `n` upstream bytes have passed in total, every open connection is cut
  (the data that would cross `n` is not forwarded); then `cut_at` is None again.
- `cut_every = n` (or `CuttingProxy(port, cut_every=n)`): every connection is cut after it has
  carried exactly `n` upstream bytes (client to server), its own count; `cuts` counts them. The
  server gets those `n` bytes then the end of the stream, as when a client dies mid-request; the
  client's connection is shut, then reset.

`upstream_bytes` counts every byte forwarded to the server, over all connections (`reset` zeroes
it and `cuts`); `connections` counts the connections accepted.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from .conftest import free_port


class _Link:
    """One client connection and its connection to the server."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.sent = 0  # upstream bytes forwarded on this connection
        self.pumps_left = 2


class CuttingProxy:
    def __init__(
        self, target_port: int, host: str = "127.0.0.1", cut_every: int | None = None
    ) -> None:
        self.target = (host, target_port)
        self.port = free_port(host)
        self.upstream_bytes = 0
        self.cut_at: int | None = None
        self.cut_every = cut_every
        self.cuts = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener = socket.create_server((host, self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://{self.target[0]}:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.upstream_bytes = 0
            self.cuts = 0

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            link = _Link(client, server)
            with self._lock:
                self._conns += [client, server]
                self.connections += 1
            threading.Thread(target=self._pump, args=(link, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(link, False), daemon=True).start()

    def _pump(self, link: _Link, upstream: bool) -> None:
        src, dst = (link.client, link.server) if upstream else (link.server, link.client)
        cut_here = False
        try:
            while True:
                data = src.recv(256 * 1024)
                if not data:
                    break
                if upstream:
                    with self._lock:
                        if (
                            self.cut_at is not None
                            and self.upstream_bytes + len(data) >= self.cut_at
                        ):
                            self.cut_at = None
                            self._cut_all()
                            return
                        if self.cut_every is not None and link.sent + len(data) >= self.cut_every:
                            data = data[: max(self.cut_every - link.sent, 0)]
                            cut_here = True
                            self.cuts += 1
                        link.sent += len(data)
                        self.upstream_bytes += len(data)
                if data:
                    dst.sendall(data)
                if cut_here:
                    return
        except OSError:
            pass
        finally:
            if cut_here:
                self._cut(link)
            else:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            self._pump_done(link)

    def _cut(self, link: _Link) -> None:
        """Cut one connection: the client's side is shut (and reset once closed with its unsent
        bytes unread); the server reads what was forwarded, then the end of the stream."""
        with contextlib.suppress(OSError):
            link.client.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            link.server.shutdown(socket.SHUT_WR)

    def _pump_done(self, link: _Link) -> None:
        with self._lock:
            link.pumps_left -= 1
            if link.pumps_left:
                return
            for sock in (link.client, link.server):
                with contextlib.suppress(ValueError):
                    self._conns.remove(sock)
        for sock in (link.client, link.server):
            with contextlib.suppress(OSError):
                sock.close()

    def _cut_all(self) -> None:
        for sock in self._conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        self._conns = []

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            self._cut_all()
