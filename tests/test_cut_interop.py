"""Real tus clients that send a whole file in one PATCH, through a network that cuts every
connection after it has carried N bytes.

Without the server keeping the prefix of a cut PATCH, such a client never finishes: each retry
starts again from the same offset and is cut again. With it, every connection moves the upload
about N bytes on, so the client finishes having sent little more than the file once, after about
size / N cuts. The web page's version of this test (8 MiB chunks) is in test_web_page.py.
"""

from __future__ import annotations

import re

import pytest
import requests
from tusclient import client as tus_client

from .conftest import MiB, sha256_file, stored
from .netproxy import CuttingProxy

pytestmark = pytest.mark.frontend  # the clients' side of tus does not depend on how writers start

N = 24 * MiB  # the proxy cuts every connection after this many upstream bytes
SIZE = 64 * MiB + 12345  # a few N, not a multiple of anything
MOST_CUTS = SIZE // N + 1  # one per N bytes sent, and one more for bad luck
MOST_SENT = 1.5 * SIZE  # restarting from 0 after each cut would never finish at all


@pytest.fixture
def cut_server(make_server):
    """An own server (its log, at INFO, says what it kept of each cut PATCH)."""
    return make_server(env={"UPLOAD_SERVER_LOG_LEVEL": "INFO"})


@pytest.fixture
def cutting_proxy(cut_server):
    instance = CuttingProxy(cut_server.port, cut_every=N)
    yield instance
    instance.close()


def kept_bytes(server) -> float:
    """upload_server_cut_bytes_total{outcome="kept"}: bytes of cut bodies the server kept."""
    text = requests.get(server.url("/metrics"), timeout=10).text
    match = re.search(r'^upload_server_cut_bytes_total\{outcome="kept"\} (\S+)$', text, re.M)
    assert match, "no upload_server_cut_bytes_total in /metrics"
    return float(match.group(1))


def check_figures(server, proxy: CuttingProxy, figures: dict) -> None:
    figures.update(
        size=SIZE,
        sent=proxy.upstream_bytes,
        cuts=proxy.cuts,
        connections=proxy.connections,
        kept=kept_bytes(server),
    )
    print(figures)
    assert proxy.cuts >= SIZE // N, f"the network was cut less than expected: {figures}"
    assert proxy.cuts <= MOST_CUTS, figures
    assert proxy.upstream_bytes < MOST_SENT, figures
    assert figures["kept"] > 0, figures


def test_tus_js_client_at_its_default_chunk_size_finishes_through_cuts(
    cut_server, cutting_proxy, tus_js, files
):
    source = files(SIZE, seed=41)
    outcome = tus_js(  # no chunkSize: tus-js-client's default, the whole file in one PATCH
        endpoint=cutting_proxy.base + "/files/",
        file=str(source),
        metadata={"filename": "js-whole.bin"},
    )
    assert sha256_file(stored(cut_server, outcome["url"])) == sha256_file(source)
    requests_sent = outcome["requests"]
    check_figures(cut_server, cutting_proxy, {"requests": requests_sent})
    # One retry (a HEAD, then a PATCH of the rest) per cut, no more.
    assert requests_sent.get("HEAD", 0) <= cutting_proxy.cuts, requests_sent
    assert requests_sent["PATCH"] <= cutting_proxy.cuts + 1, requests_sent


def test_tuspy_with_one_chunk_finishes_through_cuts(cut_server, cutting_proxy, files):
    source = files(SIZE, seed=42)
    uploader = tus_client.TusClient(cutting_proxy.base + "/files/").uploader(
        str(source),
        chunk_size=SIZE,  # the whole file in one PATCH
        metadata={"filename": "tuspy-whole.bin"},
        retries=MOST_CUTS,
        retry_delay=1,
    )
    uploader.upload()
    assert sha256_file(stored(cut_server, uploader.url)) == sha256_file(source)
    # tuspy opens a connection per request: the creation, then a HEAD and a PATCH per retry.
    retries = (cutting_proxy.connections - 2) // 2
    check_figures(cut_server, cutting_proxy, {"retries": retries})
    assert retries <= cutting_proxy.cuts
