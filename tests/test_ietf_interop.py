"""The real tus-js-client (npm, on node) speaking the IETF draft (`protocol: 'ietf-draft-03'`, which
sends interop version 5, and `'ietf-draft-05'`, interop 6) against a real server: byte-identical
files, in chunks and in one request through a network that cuts every connection."""

from __future__ import annotations

import pytest

from .conftest import MiB, sha256_file, stored
from .netproxy import CuttingProxy

pytestmark = pytest.mark.frontend

PROTOCOLS = ["ietf-draft-03", "ietf-draft-05"]
N = 12 * MiB  # the proxy cuts every connection after this many upstream bytes
SIZE = 30 * MiB + 4321


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tus_js_client_speaks_the_draft_in_chunks(server, tus_js, files, protocol):
    source = files(5 * MiB + 77, seed=51)
    outcome = tus_js(
        endpoint=server.url("/files/"),
        file=str(source),
        chunkSize=MiB,
        protocol=protocol,
        metadata={"filename": "draft.bin"},
    )
    status = server.status(outcome["url"].rsplit("/", 1)[1])
    assert status["protocol"] == "ietf"
    assert sha256_file(stored(server, outcome["url"])) == sha256_file(source)
    assert outcome["requests"] == {"POST": 1, "PATCH": 6}


@pytest.fixture
def cutting_proxy(server):
    instance = CuttingProxy(server.port, cut_every=N)
    yield instance
    instance.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tus_js_client_finishes_through_cuts(server, cutting_proxy, tus_js, files, protocol):
    """The whole file in one append (tus-js-client's default), cut every N bytes: the server keeps
    each prefix, so every retry (a HEAD, then an append of the rest) moves the upload on."""
    source = files(SIZE, seed=52)
    outcome = tus_js(
        endpoint=cutting_proxy.base + "/files/",
        file=str(source),
        protocol=protocol,
        metadata={"filename": "draft-cut.bin"},
    )
    assert sha256_file(stored(server, outcome["url"])) == sha256_file(source)
    assert cutting_proxy.cuts >= SIZE // N
    assert cutting_proxy.upstream_bytes < 1.5 * SIZE
    assert outcome["requests"].get("HEAD", 0) <= cutting_proxy.cuts, outcome
