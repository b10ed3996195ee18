"""Real, unmodified tus clients against a real server: tuspy (PyPI) and tus-js-client (npm, on node).

A counting proxy sits between client and server, so a test can cut the network mid-upload and count
what a resuming client sends again.
"""

from __future__ import annotations

import pytest
import requests
from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError
from tusclient.storage.filestorage import FileStorage

from .conftest import MiB, sha256_file, stored
from .netproxy import CuttingProxy

pytestmark = pytest.mark.frontend  # the clients' side of tus does not depend on how writers start

SIZE = 20 * MiB
OVERHEAD = 64 * 1024  # request lines and headers of a resumed upload, generously


@pytest.fixture
def proxy(server):
    instance = CuttingProxy(server.port)
    yield instance
    instance.close()


def offset_of(server, url: str) -> int:
    return server.status(url.rsplit("/", 1)[1])["bytesWritten"]


# -- tuspy ------------------------------------------------------------------------------------


def test_tuspy_uploads_20_mib_in_1_mib_chunks(server, files):
    source = files(SIZE, seed=21)
    uploader = tus_client.TusClient(server.url("/files/")).uploader(
        str(source), chunk_size=MiB, metadata={"filename": "tuspy-20.bin"}
    )
    uploader.upload()
    path = stored(server, uploader.url)
    assert path.name == "tuspy-20.bin"
    assert sha256_file(path) == sha256_file(source)


def test_tuspy_resumes_after_a_dropped_connection(server, proxy, files, tmp_path):
    source = files(SIZE, seed=22)
    storage = FileStorage(str(tmp_path / "tuspy-urls.json"))
    proxy.cut_at = int(SIZE * 0.4)
    first = tus_client.TusClient(proxy.base + "/files/").uploader(
        str(source), chunk_size=MiB, store_url=True, url_storage=storage
    )
    with pytest.raises((TusCommunicationError, requests.ConnectionError)):
        first.upload()
    with open(source, "rb") as handle:
        url = storage.get_item(first.fingerprinter.get_fingerprint(handle))
    assert url, "tuspy stored no upload URL"
    committed = offset_of(server, url)
    assert 0.3 * SIZE <= committed <= 0.45 * SIZE

    proxy.reset()
    second = tus_client.TusClient(proxy.base + "/files/").uploader(
        str(source), chunk_size=MiB, store_url=True, url_storage=storage
    )
    second.upload()
    assert second.url == url
    assert sha256_file(stored(server, url)) == sha256_file(source)
    assert proxy.upstream_bytes <= SIZE - committed + OVERHEAD


# -- tus-js-client ----------------------------------------------------------------------------


def test_tus_js_client_uploads_20_mib_in_1_mib_chunks(server, tus_js, files):
    source = files(SIZE, seed=23)
    outcome = tus_js(
        endpoint=server.url("/files/"),
        file=str(source),
        chunkSize=MiB,
        metadata={"filename": "js-20.bin", "filetype": "application/x-test"},
    )
    path = stored(server, outcome["url"])
    assert path.name == "js-20.bin"
    assert sha256_file(path) == sha256_file(source)


def test_tus_js_client_resumes_from_the_stored_url(server, proxy, tus_js, files):
    source = files(SIZE, seed=24)
    first = tus_js(endpoint=proxy.base + "/files/", file=str(source), chunkSize=MiB, stopAt=0.4)
    assert first["aborted"] is True
    url = first["url"]
    committed = offset_of(server, url)
    assert committed >= 0.3 * SIZE

    proxy.reset()
    second = tus_js(endpoint=proxy.base + "/files/", file=str(source), chunkSize=MiB, uploadUrl=url)
    assert second["url"] == url
    assert sha256_file(stored(server, url)) == sha256_file(source)
    assert proxy.upstream_bytes <= SIZE - committed + OVERHEAD


def test_tus_js_client_parallel_uploads_use_concatenation(server, tus_js, files):
    source = files(SIZE + 12345, seed=25)
    outcome = tus_js(
        endpoint=server.url("/files/"),
        file=str(source),
        chunkSize=MiB,
        parallelUploads=3,
        metadata={"filename": "parallel.bin"},
    )
    status = server.status(outcome["url"].rsplit("/", 1)[1])
    assert status["completed"] is True
    path = server.upload_dir / status["storedAs"]
    assert path.name == "parallel.bin"
    assert sha256_file(path) == sha256_file(source)
