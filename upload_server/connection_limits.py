"""How many connections the server holds, from whom, and how long a slow one may take.

- `--max-connections`: lowered at start to what the open-file limit allows (the soft limit is first
  raised to the hard one; a connection whose body spills to disk holds two descriptors). Past it a
  new connection is answered `503 server_busy` with Retry-After at once and closed.
- `--max-connections-per-client`: the client is the peer address (IPv6 grouped by its /64); past
  it a new connection is answered `429 too_many_connections`. Behind a proxy every connection
  comes from the proxy's address: set the cap to 0 (off) or high enough there.
- `--header-timeout`: a request's headers must be complete this long after its first byte (for a
  connection's first request, after it was accepted), whatever trickles in meanwhile.
- `--min-body-rate` over `--min-body-rate-window`: once a body has been arriving for a window, each
  window must bring at least rate x window bytes. A connection below it is closed through
  `handle_close`, so a cut tus PATCH keeps what arrived.

- Request bodies held in memory: each body stays in memory up to waitress's `inbuf_overflow`
  (512 KiB) while all of them together hold at most `BODY_MEMORY`; past it a new body spills to
  its (spool) file after `SMALL_SPILL`. 2,000 connections that each sent 400 KiB of a body then
  keep the process near 160 MiB, not 860.

The checks run on waitress's I/O thread, from the event loop's tick (once a second). Also here:
waitress's accept, which answers the refusals, and its listener's `readable`, whose limit is ours.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import time
from dataclasses import dataclass
from typing import Any

import waitress.server
import waitress.wasyncore

from .clients import client_key
from .errors import error_body
from .event_loop import LOOP

log = logging.getLogger("upload_server.waitress")

FDS_PER_CONNECTION = 2  # its socket, and the temporary file its body may spill to
FD_RESERVE = 128  # descriptors kept for the spool, records, logs, pipes and refusals
SELECT_LIMIT = 500  # where only select() exists (Windows: 512 sockets per call)
RETRY_AFTER = 5  # seconds, in the Retry-After of a refusal
REFUSAL_LINGER = 2.0  # seconds a refused connection may take to send its request and read why
REFUSALS_HELD = 64  # refused connections lingering at once, at most; past it they just close
BODY_MEMORY = 128 * 1024**2  # request body bytes held in memory by all connections together
SMALL_SPILL = 16 * 1024  # where a body spills to disk once the memory above is spoken for


@dataclass(frozen=True)
class Limits:
    max_connections: int = 2048
    max_connections_per_client: int = 256
    header_timeout: float = 30.0
    min_body_rate: int = 1024
    min_body_rate_window: float = 60.0
    # peers the per-client cap does not count: an explicit --trusted-proxy, whose connections
    # carry many clients (the app counts those by their forwarded address instead)
    uncapped: frozenset[str] = frozenset()


def uses_select() -> bool:
    return selectors.DefaultSelector is selectors.SelectSelector


def effective_max_connections(requested: int) -> int:
    """`requested`, lowered to what this process's open-file limit allows (raised first)."""
    allowed = requested
    try:
        import resource
    except ImportError:  # Windows: no RLIMIT_NOFILE
        resource = None  # type: ignore[assignment]
    if resource is not None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft != hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
            except (ValueError, OSError):
                pass
        if soft != resource.RLIM_INFINITY:
            allowed = min(allowed, max(1, (soft - _open_fds() - FD_RESERVE) // FDS_PER_CONNECTION))
    if uses_select():
        allowed = min(allowed, SELECT_LIMIT)
    if allowed < requested:
        log.warning(
            "max connections lowered from %d to %d (open-file limit%s)",
            requested,
            allowed,
            ", select()" if uses_select() else "",
        )
    else:
        log.info("max connections: %d", allowed)
    return allowed


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


def peer_key(addr: Any) -> str | None:
    """A connection's peer as the per-client cap counts it (`clients.client_key` of its host;
    None for a UNIX socket, which is not capped)."""
    host = addr[0] if isinstance(addr, tuple | list) and addr else None
    return client_key(host) if isinstance(host, str) else None


class Admission:
    """The open connections (waitress channels) of this process, in all and per client."""

    def __init__(self) -> None:
        self.limits = Limits()
        self.max_connections = self.limits.max_connections
        self.channels: dict[Any, str | None] = {}
        self.per_client: dict[str, int] = {}
        self.refusals: dict[Refusal, float] = {}
        self.body_memory = 0  # bytes of BODY_MEMORY reserved by bodies being received

    def reserve_body_memory(self, wanted: int) -> int:
        """How many bytes of a new body may stay in memory before it spills to a file: `wanted`
        while the budget lasts, else a little. `release_body_memory` gives it back."""
        if self.body_memory + wanted <= BODY_MEMORY:
            self.body_memory += wanted
            return wanted
        return min(wanted, SMALL_SPILL)

    def release_body_memory(self, reserved: int) -> None:
        self.body_memory = max(0, self.body_memory - reserved)

    def configure(self, limits: Limits, max_connections: int) -> None:
        self.limits = limits
        self.max_connections = max_connections

    @property
    def hard_limit(self) -> int:
        """waitress's own `connection_limit` (sockets in its map): ours plus room for refusals."""
        return self.max_connections + REFUSALS_HELD + 8

    def refusal(self, addr: Any) -> tuple[str, str, str] | None:
        """Why a new connection from `addr` is refused (status, code, message), or None."""
        if len(self.channels) >= self.max_connections:
            return (
                "503 Service Unavailable",
                "server_busy",
                "the server is at its connection limit",
            )
        cap = self.limits.max_connections_per_client
        key = peer_key(addr)
        if key in self.limits.uncapped:
            return None
        if cap and key is not None and self.per_client.get(key, 0) >= cap:
            return (
                "429 Too Many Requests",
                "too_many_connections",
                f"at most {cap} connections per client",
            )
        return None

    def opened(self, channel: Any) -> None:
        key = peer_key(getattr(channel, "addr", None))
        self.channels[channel] = key
        if key is not None:
            self.per_client[key] = self.per_client.get(key, 0) + 1

    def closed(self, channel: Any) -> None:
        if channel not in self.channels:
            return
        key = self.channels.pop(channel)
        if key is not None:
            left = self.per_client.get(key, 1) - 1
            if left > 0:
                self.per_client[key] = left
            else:
                self.per_client.pop(key, None)

    def refuse(self, conn: socket.socket, why: tuple[str, str, str], socket_map: dict) -> None:
        """Answer `why` on a connection not taken, then close it (lingering briefly, so that the
        answer is not lost to a reset when the client's request arrives after it)."""
        status, code, message = why
        body = error_body(code, message)
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER}\r\n"
            f"Access-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n"
        )
        data = head.encode("latin-1") + body
        if len(self.refusals) >= REFUSALS_HELD:
            _send_and_close(conn, data)
            return
        refusal = Refusal(conn, data, socket_map)
        self.refusals[refusal] = time.monotonic() + REFUSAL_LINGER

    def check(self, now: float) -> None:
        """Close connections past their deadlines (called once a second by the loop)."""
        clock = time.monotonic()
        for refusal, deadline in list(self.refusals.items()):
            if clock >= deadline or refusal.socket is None:
                refusal.close()
        limits = self.limits
        closed = {"header": 0, "body": 0}
        for channel in list(self.channels):
            why = _overdue(channel, clock, limits)
            if why is None:
                continue
            closed[why] += 1
            channel.cut_reason = "timeout"
            try:
                channel.handle_close()
            except Exception:  # never let one channel stop the checks
                log.exception("could not close a slow connection")
                self.closed(channel)
        if closed["header"]:
            log.info(
                "closed %d connections whose headers took over %ss",
                closed["header"],
                limits.header_timeout,
            )
        if closed["body"]:
            log.info(
                "closed %d connections sending bodies slower than %d bytes/s",
                closed["body"],
                limits.min_body_rate,
            )


def _overdue(channel: Any, clock: float, limits: Limits) -> str | None:
    if channel.requests or not channel.connected:
        return None  # the server, not the client, is what it waits on
    request = channel.request
    timeout = limits.header_timeout
    if request is None:
        if timeout and not channel.had_request and clock - channel.opened_at > timeout:
            return "header"  # a connection that never began its first request
        return None
    if not request.headers_finished:
        started = getattr(request, "started", clock)
        return "header" if timeout and clock - started > timeout else None
    if request.completed or not limits.min_body_rate or request.body_rcv is None:
        return None
    received = len(request.body_rcv)
    mark = getattr(request, "rate_mark", None)
    if mark is None or not channel.readable():
        request.rate_mark = (clock, received)  # the window starts (again) now
        return None
    since, at = mark
    if clock - since < limits.min_body_rate_window:
        return None
    if (received - at) < limits.min_body_rate * (clock - since):
        return "body"
    request.rate_mark = (clock, received)
    return None


class Refusal(waitress.wasyncore.dispatcher):
    """A refused connection: sends its answer, half-closes, reads (and drops) what the client
    sends until it closes or the linger ends."""

    def __init__(self, conn: socket.socket, data: bytes, socket_map: dict) -> None:
        super().__init__(conn, map=socket_map)
        self.pending = data
        self.handle_write()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return bool(self.pending)

    def handle_read(self) -> None:
        try:
            data = self.socket.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.close()

    def handle_write(self) -> None:
        if not self.pending or self.socket is None:
            return
        try:
            sent = self.socket.send(self.pending)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self.pending = self.pending[sent:]
        if not self.pending:
            with contextlib.suppress(OSError):
                self.socket.shutdown(socket.SHUT_WR)

    def handle_close(self) -> None:
        self.close()

    def handle_error(self) -> None:
        self.close()

    def del_channel(self, map: Any = None) -> None:
        LOOP.closing(self._fileno, self)  # while its socket is still open
        super().del_channel(map)

    def close(self) -> None:
        ADMISSION.refusals.pop(self, None)
        super().close()


def _send_and_close(conn: socket.socket, data: bytes) -> None:
    try:
        conn.setblocking(False)
        conn.send(data)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    conn.close()


ADMISSION = Admission()


ACCEPT_BATCH = 128  # connections accepted in one pass of the loop, at most


def accept_waiting(self: waitress.server.BaseWSGIServer) -> None:
    """waitress's `handle_accept`, repeated until no connection waits (or the limit is reached):
    one per pass would leave a burst of clients waiting one loop pass each."""
    for _ in range(ACCEPT_BATCH):
        if len(self._map) >= ADMISSION.hard_limit:
            return
        try:
            accepted = self.accept()
        except OSError:
            if self.adj.log_socket_errors:
                self.logger.warning("server accept() threw an exception", exc_info=True)
            return
        if accepted is None:
            return
        conn, addr = accepted
        try:
            self.set_socket_options(conn)
        except OSError:  # the peer closed before it was accepted
            conn.close()
            continue
        addr = self.fix_addr(addr)
        refusal = ADMISSION.refusal(addr)
        if refusal is not None:
            ADMISSION.refuse(conn, refusal, self._map)
            continue
        self.channel_class(self, conn, addr, self.adj, map=self._map)


def accepting(self: waitress.server.BaseWSGIServer) -> bool:
    """waitress's `readable` for a listener (maintenance every `cleanup_interval`), with its
    connection limit replaced by ours: past `--max-connections` connections are still accepted,
    to be answered 503 at once, up to room for those answers."""
    now = time.time()
    if now >= self.next_channel_cleanup:
        self.next_channel_cleanup = now + self.adj.cleanup_interval
        self.maintenance(now)
    return bool(self.accepting) and len(self._map) < ADMISSION.hard_limit
