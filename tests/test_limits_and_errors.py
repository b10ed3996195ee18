"""Limits no one client can use up for everyone, and errors that always answer.

Real servers in subprocesses, loopback only. Clients bind their socket's source address
(127.0.0.1, 127.0.0.2, ...: all of 127/8 is loopback on Linux) to look like different clients.
"""

from __future__ import annotations

import concurrent.futures
import random
import socket

import pytest
import requests
from requests.adapters import HTTPAdapter

from .conftest import MiB, wait_for
from .tus_http import Tus

# -- clients by source address -----------------------------------------------------------------


class _SourceAddress(HTTPAdapter):
    """Every connection of a requests session leaves from `source` (a loopback address)."""

    def __init__(self, source: str, **kwargs) -> None:
        self.source = source
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs) -> None:
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def tus_from(server, source: str) -> Tus:
    client = Tus(server.base)
    client.http.mount("http://", _SourceAddress(source, pool_maxsize=8))
    return client


def _create_many(client: Tus, count: int, threads: int = 8) -> list[requests.Response]:
    """`count` creations of 10-byte uploads, a few at a time."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda _: client.create(10), range(count)))


def _other_loopback_works() -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.2", 0))
        except OSError:
            return False
    return True


needs_loopback_aliases = pytest.mark.skipif(
    not _other_loopback_works(), reason="127.0.0.2 is not usable as a source address here"
)


def _check_one_client_is_limited(server, limit: int, extra: int) -> list[str]:
    """`limit + extra` creations from 127.0.0.1: `limit` succeed, the rest get 429, and
    127.0.0.2 can still create and upload through both APIs. The URLs 127.0.0.1 created."""
    greedy = tus_from(server, "127.0.0.1")
    responses = _create_many(greedy, limit + extra)
    codes = [r.status_code for r in responses]
    assert codes.count(201) == limit and codes.count(429) == extra, sorted(set(codes))
    refused = greedy.create(10)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_sessions"
    assert refused.headers.get("Retry-After")
    seed = greedy.http.post(server.url("/upload"), files={"file": ("a", b"abc")}, timeout=30)
    assert seed.status_code == 429 and seed.json()["error"]["code"] == "too_many_sessions"

    other = tus_from(server, "127.0.0.2")
    data = random.Random(1).randbytes(MiB + 5)
    url = other.upload(data, chunk=256 * 1024, filename="other.bin")
    status = server.status(url.rsplit("/", 1)[1])
    assert status["completed"] and (server.upload_dir / status["storedAs"]).read_bytes() == data
    seed = other.http.post(server.url("/upload"), files={"file": ("s.bin", b"seed")}, timeout=30)
    assert seed.status_code == 201, seed.text
    assert server.wait_state(seed.json()["sessionID"], "completed")["completed"]
    return [r.headers["Location"] for r in responses if r.status_code == 201]


@needs_loopback_aliases
def test_one_client_cannot_use_up_the_session_limit(make_server):
    # auth off (the default): the per-owner limit counts per client, not one shared owner
    server = make_server(["--max-sessions-per-owner", "100"])
    urls = _check_one_client_is_limited(server, 100, 10)

    # the address never owns anything: an upload created from 127.0.0.1 is seen, continued and
    # finished from 127.0.0.3 (a phone that moved to another network)...
    moved = tus_from(server, "127.0.0.3")
    head = moved.head(urls[0])
    assert head.status_code == 200 and head.headers["Upload-Offset"] == "0"
    assert moved.patch(urls[0], 0, b"0123456789").status_code == 204
    status = moved.http.get(
        server.url("/upload/status"), params={"sessionID": urls[0].rsplit("/", 1)[1]}, timeout=10
    )
    assert status.json()["completed"] is True
    # ... and it still counted against 127.0.0.1, which gets that slot back
    greedy = tus_from(server, "127.0.0.1")
    wait_for(lambda: greedy.create(10).status_code == 201)
    assert greedy.create(10).status_code == 429
    assert moved.delete(urls[1]).status_code == 204  # terminating frees a slot too
    wait_for(lambda: greedy.create(10).status_code == 201)

    # the limits' index survives a restart: the recovered sessions still count per client
    server.stop()
    server.start()
    assert tus_from(server, "127.0.0.1").create(10).status_code == 429
    assert tus_from(server, "127.0.0.2").create(10).status_code == 201


@needs_loopback_aliases
def test_default_limit_with_1100_creations_from_one_address(make_server):
    # the numbers: 1,100 creations from one address at the default limit (1,000)
    server = make_server()
    _check_one_client_is_limited(server, 1000, 100)


def test_client_keys_group_ipv6_by_64():
    from upload_server.clients import client_key

    assert client_key("203.0.113.7") == "ip:203.0.113.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:2::1") == "ip:2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.1") == "ip:192.0.2.1"
    assert client_key("fe80::1%eth0") == "ip:fe80::/64"
    assert client_key(None) is None and client_key("") is None
    assert client_key("not an address") == "addr:not an address"
