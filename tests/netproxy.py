"""A TCP proxy on loopback that counts what clients send and can cut every connection once.

It stands between a real client and the server so a test can count the bytes a client sends after
resuming, and can drop the network in the middle of an upload, as a bad network would.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from .conftest import free_port


class CuttingProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.port = free_port(host)
        self.upstream_bytes = 0
        self.cut_at: int | None = None
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

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
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
                        self.upstream_bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

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
