"""A loopback TCP proxy that cuts every connection once it has carried a set number of bytes upstream.

It stands between a client and one target, both on 127.0.0.1, and forwards bytes both ways. Once a
connection has forwarded exactly `cut_after` bytes from the client to the target, the proxy drops it:
the target gets those bytes and then a FIN (a peer gone in the middle of a request body), the
client gets a RST on the connection it is still writing to (a network error, no response). Each new
connection gets its own `cut_after` bytes. The proxy counts what it forwarded and how often it cut.

    proxy = CutProxy(target_port, cut_after=24 * MiB)
    proxy.start()       # proxy.port is where the client connects
    ...
    proxy.stop()        # closes the listener and every connection; proxy.stats() stays readable
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

HOST = "127.0.0.1"  # loopback only, both sides
BUFFER = 256 * 1024


@dataclass
class Stats:
    connections: int = 0
    cuts: int = 0
    bytes_up: int = 0  # client -> target, everything forwarded (headers and bodies)
    bytes_down: int = 0  # target -> client


@dataclass(eq=False)  # each link is its own, hashable by identity
class _Link:
    client: socket.socket
    upstream: socket.socket
    up: int = 0  # bytes this connection forwarded upstream
    pumps_left: int = 2
    cut: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class CutProxy:
    def __init__(self, target_port: int, cut_after: int) -> None:
        if cut_after <= 0:
            raise ValueError("cut_after must be positive")
        self.target = (HOST, target_port)
        self.cut_after = cut_after
        self.port = 0
        self._stats = Stats()
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._stopping = False

    def start(self) -> None:
        self._listener = socket.create_server((HOST, 0))
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept)

    def stats(self) -> Stats:
        with self._lock:
            return Stats(**self._stats.__dict__)

    def stop(self) -> None:
        self._stopping = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            _shutdown(link.client)
            _shutdown(link.upstream)
        for thread in self._threads:
            thread.join(10)

    # -- threads --------------------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream)
            with self._lock:
                self._stats.connections += 1
                self._links.add(link)
            self._spawn(self._pump_up, link)
            self._spawn(self._pump_down, link)

    def _pump_up(self, link: _Link) -> None:
        """Client -> target, never more than `cut_after` bytes per connection, then the cut."""
        view = memoryview(bytearray(BUFFER))
        try:
            while True:
                room = min(BUFFER, self.cut_after - link.up)
                received = link.client.recv_into(view[:room])
                if not received:
                    link.upstream.shutdown(socket.SHUT_WR)  # the client finished sending
                    break
                link.upstream.sendall(view[:received])
                link.up += received
                with self._lock:
                    self._stats.bytes_up += received
                if link.up >= self.cut_after:
                    self._cut(link)
                    break
        except OSError:
            self._drop(link)
        finally:
            self._pump_done(link)

    def _pump_down(self, link: _Link) -> None:
        view = memoryview(bytearray(BUFFER))
        try:
            while True:
                received = link.upstream.recv_into(view)
                if not received:
                    if not link.cut:
                        link.client.shutdown(socket.SHUT_WR)  # the target closed: pass it on
                    break
                link.client.sendall(view[:received])
                with self._lock:
                    self._stats.bytes_down += received
        except OSError:
            self._drop(link)
        finally:
            self._pump_done(link)

    def _cut(self, link: _Link) -> None:
        with link.lock:
            link.cut = True
        with self._lock:
            self._stats.cuts += 1
        # The client gets a RST, and no response, when its socket is closed (linger 0) right after
        # the other pump returns; the target gets every byte forwarded so far, then end of stream.
        with contextlib.suppress(OSError):
            link.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        _shutdown(link.upstream)

    def _drop(self, link: _Link) -> None:
        """One side failed: end both (the other pump wakes up and finishes)."""
        _shutdown(link.client)
        _shutdown(link.upstream)

    def _pump_done(self, link: _Link) -> None:
        with link.lock:
            link.pumps_left -= 1
            last = link.pumps_left == 0
        if last:
            link.client.close()
            link.upstream.close()
            with self._lock:
                self._links.discard(link)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
