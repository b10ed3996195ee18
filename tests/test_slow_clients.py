"""Slow and many clients (upload_server/event_loop.py, connection_limits.py), over real sockets.

Hundreds of connections trickle a header byte a second from 127.0.0.2..127.0.0.9 (so that the
per-client cap is not what stops them): /healthz and a 16 MiB tus upload go on, and the header
deadline closes them. A body below the minimum rate is cut, keeps what arrived, and the upload
resumes byte-identical. Past the per-client cap a connection gets 429, past the connection limit
503, both at once and as JSON with Retry-After.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from .conftest import MiB, Server, wait_for
from .test_cut_bodies import finish_and_compare, offset_of, open_cut, path_of
from .tus_http import OCTET, TUS, Tus

SLOW = 1000  # trickling connections
SOURCES = [f"127.0.0.{n}" for n in range(2, 10)]


@pytest.fixture(autouse=True, scope="module")
def _open_files() -> None:
    """This process holds hundreds of sockets: raise its own open-file limit."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if min(wanted, hard) < SLOW + 256:
        pytest.skip(f"needs {SLOW + 256} open files, the hard limit is {hard}")


def connect_from(server: Server, source: str, timeout: float = 10) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect((server.host, server.port))
    except OSError:
        sock.close()
        raise
    return sock


def raw_get(server: Server, path: str, source: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    """GET over a new connection from `source`: status, headers (lower-case), body."""
    with connect_from(server, source) as sock:
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def readable(sock: socket.socket) -> bool:
    """Whether `sock` has data or an end to read now (poll, not select: a test may hold more
    than 1,024 descriptors)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def is_closed(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (without waiting)."""
    try:
        if not readable(sock):
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class Tricklers:
    """`count` connections that sent a request line and then send one header byte a second."""

    def __init__(self, server: Server, count: int) -> None:
        self.socks: list[socket.socket] = []
        self.stop = threading.Event()
        line = b"POST /files/ HTTP/1.1\r\nHost: x\r\nX-Slow: "
        for n in range(count):
            sock = connect_from(server, SOURCES[n % len(SOURCES)])
            sock.sendall(line)
            self.socks.append(sock)
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        while not self.stop.wait(1.0):
            for sock in self.socks:
                with contextlib.suppress(OSError):
                    sock.send(b"a", socket.MSG_DONTWAIT)

    def closed(self) -> int:
        return sum(is_closed(sock) for sock in self.socks)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for sock in self.socks:
            sock.close()


@pytest.fixture
def tricklers() -> Iterator[list[Tricklers]]:
    made: list[Tricklers] = []
    yield made
    for group in made:
        group.close()


def healthz_latency(server: Server, rounds: int = 10) -> float:
    worst = 0.0
    for _ in range(rounds):
        started = time.monotonic()
        response = requests.get(server.url("/healthz"), timeout=10)
        worst = max(worst, time.monotonic() - started)
        assert response.status_code == 200
    return worst


def timed_upload(server: Server, data: bytes) -> float:
    tus = Tus(server.base)
    try:
        started = time.monotonic()
        url = tus.upload(data, chunk=4 * MiB, filename="fast.bin")
        elapsed = time.monotonic() - started
    finally:
        tus.http.close()
    status = wait_for(
        lambda: (s := server.status(url.rstrip("/").rsplit("/", 1)[1]))["completed"] and s,
        timeout=30,
    )
    stored = server.upload_dir / status["storedAs"]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    return elapsed


def report(**figures: float) -> None:
    """Measured figures, for the record (pytest -s shows them)."""
    print("slow-clients:", json.dumps({k: round(v, 3) for k, v in figures.items()}))


def test_trickling_headers_stop_nothing_and_are_closed_at_the_deadline(make_server, tricklers):
    server = make_server(["--header-timeout", "6s"])
    data = os.urandom(16 * MiB)
    alone = timed_upload(server, data)
    healthz_alone = healthz_latency(server)
    opened = time.monotonic()
    tricklers.append(group := Tricklers(server, SLOW))
    time.sleep(1.5)  # every one has trickled at least once
    assert group.closed() == 0
    healthz_slow = healthz_latency(server)
    assert healthz_slow < 1.0, healthz_slow
    crowded = timed_upload(server, data)
    assert time.monotonic() - opened < 5.5, "the measurements ran past the header deadline"
    assert group.closed() < SLOW  # they were still open for the upload
    wait_for(lambda: group.closed() == SLOW, timeout=6 + 2 + 5 - (time.monotonic() - opened))
    closed_after = time.monotonic() - opened
    assert closed_after < 6 + 2 + 5, closed_after
    assert healthz_latency(server, 3) < 1.0
    report(
        slow_connections=SLOW,
        healthz_alone_s=healthz_alone,
        healthz_with_slow_s=healthz_slow,
        upload_16mib_alone_s=alone,
        upload_16mib_with_slow_s=crowded,
        all_closed_after_s=closed_after,
    )


def test_a_body_below_the_minimum_rate_is_cut_and_resumes(make_server, files):
    server = make_server(["--min-body-rate", "64KiB", "--min-body-rate-window", "2s"])
    tus = Tus(server.base)
    source = files(2 * MiB, seed=13)
    data = source.read_bytes()
    url = tus.new(len(data), filename="slow-body.bin")
    headers = {**TUS, "Upload-Offset": "0", "Content-Type": OCTET}
    sent = 700 * 1024
    sock = open_cut(server, "PATCH", path_of(url), headers, len(data), data[:sent])
    started = time.monotonic()
    try:
        while time.monotonic() - started < 15:  # 1 KiB a second, far below 64 KiB/s
            if is_closed(sock):
                break
            with contextlib.suppress(OSError):
                sock.send(data[sent : sent + 1024])
                sent += 1024
            time.sleep(1.0)
        cut_after = time.monotonic() - started
        assert is_closed(sock), "the slow body was not cut"
        assert 1.5 <= cut_after <= 6, cut_after
    finally:
        sock.close()
    kept = wait_for(lambda: offset_of(url) or None, timeout=10)
    assert 700 * 1024 <= kept <= sent, (kept, sent)
    finish_and_compare(server, tus, url, source)
    tus.http.close()


def test_a_fast_body_is_not_cut(make_server, files):
    server = make_server(["--min-body-rate", "64KiB", "--min-body-rate-window", "1s"])
    tus = Tus(server.base)
    data = os.urandom(3 * MiB)
    url = tus.new(len(data))
    headers = {**TUS, "Upload-Offset": "0", "Content-Type": OCTET}
    sock = open_cut(server, "PATCH", path_of(url), headers, len(data), data[:1024])
    try:  # 256 KiB a second for 3 s: above the rate
        for start in range(1024, len(data), 128 * 1024):
            time.sleep(0.5)
            sock.sendall(data[start : start + 128 * 1024])
        sock.settimeout(10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 204")
    finally:
        sock.close()
    tus.http.close()


def test_the_per_client_cap_answers_429(make_server):
    server = make_server(["--max-connections-per-client", "5"])
    held = [connect_from(server, "127.0.0.2") for _ in range(5)]
    try:
        wait_for(lambda: raw_get(server, "/healthz", "127.0.0.2")[0] == 429, timeout=5)
        status, headers, body = raw_get(server, "/healthz", "127.0.0.2")
        assert status == 429
        assert headers["retry-after"].isdigit()
        assert json.loads(body)["error"]["code"] == "too_many_connections"
        assert raw_get(server, "/healthz", "127.0.0.3")[0] == 200  # another client is served
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: raw_get(server, "/healthz", "127.0.0.2")[0] == 200, timeout=5)


def test_at_the_connection_limit_new_connections_get_503_at_once(make_server):
    server = make_server(["--max-connections", "20"])
    held: list[socket.socket] = []
    try:
        for _ in range(5):  # the server may still count a connection that was closing: refill
            held += [connect_from(server, SOURCES[n % len(SOURCES)]) for n in range(20 - len(held))]
            time.sleep(0.3)
            refused = [sock for sock in held if readable(sock)]
            for sock in refused:
                held.remove(sock)
                sock.close()
            if not refused:
                break
        wait_for(lambda: raw_get(server, "/healthz")[0] == 503, timeout=5)
        started = time.monotonic()
        response = requests.get(server.url("/healthz"), timeout=10)
        elapsed = time.monotonic() - started
        assert response.status_code == 503
        assert elapsed < 1.0, elapsed
        assert response.headers["Retry-After"].isdigit()
        assert response.json()["error"]["code"] == "server_busy"
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: raw_get(server, "/healthz")[0] == 200, timeout=5)


def test_bodies_held_by_many_connections_stay_within_the_memory_budget(make_server, files):
    """1,000 connections that each sent 400 KiB of a 1 MiB body: in memory that would be 400 MiB;
    the budget (128 MiB) sends the rest to disk."""
    import psutil

    server = make_server(["--min-body-rate", "0"])
    tus = Tus(server.base)
    url = tus.new(1024 * MiB)
    tus.http.close()
    head = (
        f"PATCH {path_of(url)} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
        f"Upload-Offset: 0\r\nContent-Type: {OCTET}\r\nContent-Length: {MiB}\r\n\r\n"
    ).encode()
    body = os.urandom(400 * 1024)
    socks: list[socket.socket] = []
    try:
        for n in range(1000):
            sock = connect_from(server, SOURCES[n % len(SOURCES)])
            socks.append(sock)
            sock.sendall(head)
            sock.sendall(body)
        assert healthz_latency(server, 3) < 5.0  # the server has read them all
        rss = psutil.Process(server.proc.pid).memory_info().rss
        report(rss_mib_1000_connections_400kib_each=rss / MiB)
        assert rss < 300 * MiB, rss / MiB
    finally:
        for sock in socks:
            sock.close()


def test_the_client_is_the_address_and_ipv6_its_slash_64():
    from upload_server.connection_limits import peer_key

    assert peer_key(("127.0.0.2", 5000)) == "ip:127.0.0.2"
    assert peer_key(("2001:db8:1:2:aaaa::1", 5000)) == peer_key(("2001:db8:1:2:bbbb::9", 1))
    assert peer_key(("2001:db8:1:2::1", 5000)) != peer_key(("2001:db8:1:3::1", 5000))
    assert peer_key(("::ffff:10.0.0.1", 5000)) == "ip:10.0.0.1"
    assert peer_key("") is None  # a unix socket: not capped


def test_the_loop_runs_on_select_where_there_is_no_epoll():
    """Windows has only select(): the same loop on a SelectSelector serves requests."""
    import selectors

    import waitress.server

    from upload_server.event_loop import SelectorLoop

    def app(environ, start_response):
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    loop = SelectorLoop()
    loop.selector_class = selectors.SelectSelector
    server = waitress.server.create_server(app, host="127.0.0.1", port=0, threads=2)
    server.asyncore = loop
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            loop.loop(timeout=0.05, map=server._map, count=20)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.effective_port}/"
        for size in (0, 10, 3 * MiB):
            payload = os.urandom(size)
            response = requests.post(url, data=payload, timeout=10)
            assert response.status_code == 200
            assert response.content == payload
        loop.settle(2, 1.0)
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_behind_a_trusted_proxy_the_cap_counts_forwarded_clients(make_server):
    """Behind an explicit --trusted-proxy the proxy's own connections are not capped (they carry
    many clients); requests in flight are capped per forwarded address instead."""
    from concurrent.futures import ThreadPoolExecutor

    from .tus_http import Tus

    server = make_server(
        [
            "--trusted-proxy",
            "127.0.0.1",
            "--max-connections-per-client",
            "2",
            "--max-bytes-per-second",
            "512KiB",
        ]
    )
    tus = Tus(server.base)
    urls = [tus.new(MiB) for _ in range(4)]
    body = b"p" * MiB

    def patch(url: str, client: str) -> int:
        headers = {"X-Forwarded-For": client}
        return Tus(server.base).patch(url, 0, body, headers=headers).status_code

    with ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(patch, url, "203.0.113.5") for url in urls[:2]]
        time.sleep(0.8)  # both are in the app, waiting for their writer (2 s each)
        third = pool.submit(patch, urls[2], "203.0.113.5").result(timeout=30)
        other = pool.submit(patch, urls[3], "203.0.113.6").result(timeout=30)
        assert [f.result(timeout=30) for f in slow] == [204, 204]
    assert third == 429
    assert other == 204


def test_a_pass_reads_a_few_bodies_in_turn_and_every_other_connection():
    """Busy uploads' bodies are read at most `BODY_READS` per pass, longest unserved first, so a
    HEAD or status request waits for a few body chunks, not for every busy upload's; over
    passes every body is read."""
    import selectors as sel

    from upload_server import event_loop

    class Conn:
        accepting = False

        def __init__(self, in_body: bool) -> None:
            self.request = type("P", (), {"watch_key": object() if in_body else None})()

    def event(fd: int, conn: Conn) -> tuple[sel.SelectorKey, int]:
        return (sel.SelectorKey(None, fd, sel.EVENT_READ, conn), sel.EVENT_READ)

    loop = event_loop.SelectorLoop()
    bodies = [event(fd, Conn(True)) for fd in range(10, 20)]
    head = event(5, Conn(False))
    seen: list[int] = []
    for _ in range(-(-len(bodies) // event_loop.BODY_READS)):
        chosen = loop._ration([*bodies, head])
        assert chosen[0] is head and len(chosen) == 1 + event_loop.BODY_READS
        seen += [key.fd for key, _ in chosen[1:]]
        loop._passes += 1
    assert set(seen) == set(range(10, 20))  # nobody starved


def test_catch_up_waits_only_for_unread_bytes_that_name_the_upload():
    """A HEAD lets the loop read what has arrived (a retry may overtake its own cut connection),
    but not bytes of connections between requests that are about another upload."""
    from upload_server import event_loop

    left, right = socket.socketpair()
    try:
        conn = type("C", (), {"accepting": False, "request": None, "socket": right})()
        left.sendall(b"PATCH /files/other HTTP/1.1\r\n")
        assert event_loop._elsewhere(conn, b"mine")
        assert not event_loop._elsewhere(conn, b"other")
        assert right.recv(100).startswith(b"PATCH")  # peeked, not taken
        left.close()
        assert event_loop._elsewhere(conn, b"mine")  # a close between requests drops nothing
    finally:
        right.close()
        with contextlib.suppress(OSError):
            left.close()
