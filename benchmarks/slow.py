"""Slow clients for the `slow` row: many loopback connections that hold a server's attention.

`Tricklers` are connections that each sent half a header line and then send one byte every
`TRICKLE_EVERY` seconds (the kind the issue measured waitress with: half a header, then a trickle).
`HeldBodies` are PATCHes to uploads of their own that sent their headers and part of their body,
then wait. Both connect from 127.0.0.2..127.0.0.9 in turn (bound before connect), so that a
per-client cap (upload_server's default is 256) is not what stops them. What the server's kernel
holds for it (connections, bytes not yet read, connections not yet accepted) comes from
/proc/net/tcp, so this module needs Linux.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from client import Connection, tus_create
from targets import Skipped

SOURCES = [f"127.0.0.{n}" for n in range(2, 10)]
HALF_HEADER = b"POST /files/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
TRICKLE_EVERY = 2.0  # seconds between two bytes of one trickling connection
TICK = 0.05
CONNECT_TIMEOUT = 10.0
SETTLE_TIMEOUT = 60.0  # the longest any wait for the server here lasts
PROC_TCP = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
# /proc/net/tcp states: the server's end of a connection it has not closed yet
ESTABLISHED, SYN_RECV, CLOSE_WAIT, LISTEN = "01", "03", "08", "0A"


def check_platform(connections: int) -> None:
    """Skipped unless this is Linux (for /proc/net/tcp) and this process may open enough sockets:
    its soft open-file limit is raised to the hard limit first."""
    if not PROC_TCP[0].exists():
        raise Skipped("needs Linux (/proc/net/tcp) to see what the server has read and accepted")
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, connections + 1024)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < connections + 256:
        raise Skipped(f"needs {connections + 256} open files, the hard limit is {hard}")


def connect_from(source: str, host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.bind((source, 0))
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Kernel:
    """What the kernel holds for the server listening on `port` (all of /proc/net/tcp{,6})."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connections = 0  # the server's end, not closed by it yet
        self.unread = 0  # bytes that reached the server's sockets and that it has not read
        self.unsent = 0  # bytes the clients' sockets still hold for the server
        self.backlog = 0  # connections waiting to be accepted
        for path in PROC_TCP:
            with contextlib.suppress(FileNotFoundError), open(path) as table:
                next(table)
                for line in table:
                    self._add(line.split())

    def _add(self, fields: list[str]) -> None:
        local, remote, state, queues = fields[1], fields[2], fields[3], fields[4]
        tx_queue, rx_queue = (int(n, 16) for n in queues.split(":"))
        if int(local.rsplit(":", 1)[1], 16) == self.port:
            if state == LISTEN:
                self.backlog += rx_queue
            elif state in (ESTABLISHED, SYN_RECV, CLOSE_WAIT):
                self.connections += 1
                self.unread += rx_queue
        elif int(remote.rsplit(":", 1)[1], 16) == self.port:
            self.unsent += tx_queue


def wait_for(what: str, done: Callable[[], bool], timeout: float = SETTLE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s")
        time.sleep(TICK)


def wait_released(port: int, at_most: int = 4) -> None:
    """Wait until the server has closed its end of all but `at_most` connections."""
    wait_for("the server closing the slow connections", lambda: Kernel(port).connections <= at_most)


class Tricklers:
    """`count` connections that sent half a header line and send one more byte every
    `TRICKLE_EVERY` seconds, spread evenly over that interval. A connection the server answers or
    closes (a header deadline, a cap) is replaced at once, so that `count` stay open; `replaced`
    counts them."""

    def __init__(self, host: str, port: int, count: int) -> None:
        self.host, self.port, self.count = host, port, count
        self.replaced = 0
        self._socks: list[socket.socket | None] = [None] * count
        self._selector = selectors.DefaultSelector()  # epoll: select() stops at fd 1024
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, index: int) -> None:
        sock = connect_from(SOURCES[index % len(SOURCES)], self.host, self.port)
        sock.sendall(HALF_HEADER)
        sock.setblocking(False)
        self._socks[index] = sock
        self._selector.register(sock, selectors.EVENT_READ, index)

    def _drop(self, index: int) -> None:
        sock = self._socks[index]
        if sock is not None:
            self._socks[index] = None
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()

    def __enter__(self) -> Tricklers:
        try:
            for index in range(self.count):
                self._open(index)
            self._thread.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_open(self) -> None:
        """Wait until the server has accepted them all, then one trickle round."""
        wait_for(
            "the server accepting the slow connections", lambda: Kernel(self.port).backlog == 0
        )
        time.sleep(TRICKLE_EVERY)

    def _run(self) -> None:
        per_tick = max(1, round(self.count * TICK / TRICKLE_EVERY))
        position = 0
        while not self._stop.wait(TICK):
            for _ in range(per_tick):
                sock = self._socks[position]
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.send(b"a")
                position = (position + 1) % self.count
            for key, _ in self._selector.select(0):
                if self._stop.is_set():
                    return
                self._drop(key.data)
                self.replaced += 1
                with contextlib.suppress(OSError):
                    self._open(key.data)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        for index in range(self.count):
            self._drop(index)
        self._selector.close()


def create_uploads(host: str, port: int, endpoint: str, count: int, length: int) -> list[str]:
    """`count` tus uploads of `length` bytes, created from SOURCES in turn (one connection and
    thread per source), so that no one client address holds more than its share of sessions."""

    def create(source: str, indexes: range) -> list[str]:
        conn = Connection(host, port, timeout=60, source=source)
        try:
            return [tus_create(conn, endpoint, length, f"slow-{i}.bin") for i in indexes]
        finally:
            conn.close()

    with ThreadPoolExecutor(len(SOURCES)) as pool:
        parts = list(
            pool.map(
                create,
                SOURCES,
                [range(n, count, len(SOURCES)) for n in range(len(SOURCES))],
            )
        )
    return [location for part in parts for location in part]


class HeldBodies:
    """A PATCH per upload in `locations`, each from SOURCES in turn: its headers (a body of
    `length` bytes announced) and the first `held` bytes of the body, then nothing more until
    the connection is closed."""

    def __init__(self, host: str, port: int, locations: list[str], length: int, held: int) -> None:
        self.host, self.port, self.locations, self.length = host, port, locations, length
        self.body = os.urandom(held)
        self.socks: list[socket.socket] = []

    def __enter__(self) -> HeldBodies:
        try:
            for index, location in enumerate(self.locations):
                sock = connect_from(SOURCES[index % len(SOURCES)], self.host, self.port)
                self.socks.append(sock)
                head = (
                    f"PATCH {location} HTTP/1.1\r\nHost: {self.host}\r\nTus-Resumable: 1.0.0\r\n"
                    "Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
                    f"Content-Length: {self.length}\r\n\r\n"
                ).encode()
                sock.settimeout(SETTLE_TIMEOUT)
                sock.sendall(head)
                sock.sendall(self.body)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def answered(self) -> int:
        """How many of the connections the server has answered or closed already."""
        with selectors.DefaultSelector() as selector:
            for sock in self.socks:
                selector.register(sock, selectors.EVENT_READ)
            return len(selector.select(0))

    def wait_read(self) -> None:
        """Wait until the server has accepted every connection and read every byte sent."""

        def done() -> bool:
            kernel = Kernel(self.port)
            return kernel.backlog == 0 and kernel.unread == 0 and kernel.unsent == 0

        wait_for("the server reading the partial bodies", done)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.socks = []


class PeakRss:
    """The peak RSS of one process (not its children), sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()


def wait_quiet(processes: Callable[[], list[psutil.Process]], timeout: float = 30.0) -> None:
    """Wait (at most `timeout` s) until the processes use under 5% of a CPU for half a second:
    a server storing what the closed connections left must not slow the next measurement."""

    def cpu() -> float:
        total = 0.0
        for process in processes():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    deadline = time.monotonic() + timeout
    before = cpu()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu()
        if now - before < 0.025:
            return
        before = now
