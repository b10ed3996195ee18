"""Operating the server: /metrics, /readyz, request ids and JSON logs, batch status."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import psutil
import pytest
import requests

from .conftest import MiB, free_port, wait_for
from .tus_http import Tus


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    wanted = {k: str(v) for k, v in labels.items()}
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(3) or ""))
        if all(found.get(k) == v for k, v in wanted.items()):
            total += float(match.group(4))
    return total


def test_metrics_match_what_happened(make_server, files):
    server = make_server(["--min-free-space", "0"])
    fresh = requests.get(server.url("/metrics"), timeout=10).text
    for zero in [
        'upload_server_uploads_started_total{protocol="seed"} 0.0',
        'upload_server_uploads_completed_total{protocol="tus"} 0.0',
        'upload_server_uploads_ended_total{how="expired"} 0.0',
        'upload_server_hook_deliveries_total{event="post-finish",outcome="delivered"} 0.0',
        "upload_server_active_sessions 0.0",
    ]:
        assert zero in fresh, zero
    sizes = [MiB + 10, 3 * MiB, 1234]
    ids = [
        server.post_file(files(size, seed=i)).json()["sessionID"] for i, size in enumerate(sizes)
    ]
    for session_id in ids:
        server.wait_state(session_id, "completed")
    tus = Tus(server.base)
    tus.upload(b"t" * 5000)
    bad = requests.post(
        server.url("/upload"),
        files={"file": ("bad.bin", b"x" * 100)},
        data={"sha256": "0" * 64},
        timeout=10,
    ).json()["sessionID"]
    server.wait_state(bad, "failed")
    doomed = tus.new(10)
    tus.delete(doomed)
    requests.get(server.url("/upload/status"), params={"sessionID": "nope" * 6}, timeout=10)

    def scraped() -> str:
        return requests.get(server.url("/metrics"), timeout=10).text

    text = wait_for(
        lambda: (
            (t := scraped())
            and metric(t, "upload_server_uploads_completed_total", protocol="seed") == 3
            and t
        )
    )
    assert metric(text, "upload_server_uploads_started_total", protocol="seed") == 4
    assert metric(text, "upload_server_uploads_started_total", protocol="tus") == 2
    assert metric(text, "upload_server_uploads_completed_total", protocol="tus") == 1
    assert metric(text, "upload_server_uploads_failed_total", reason="digest_mismatch") == 1
    assert metric(text, "upload_server_uploads_ended_total", how="terminated") == 1
    assert metric(text, "upload_server_bytes_received_total", protocol="seed") == sum(sizes) + 100
    assert metric(text, "upload_server_bytes_received_total", protocol="tus") == 5000
    assert metric(text, "upload_server_bytes_written_total") == sum(sizes) + 100 + 5000
    assert metric(text, "upload_server_bytes_spooled_total") == sum(sizes) + 100 + 5000
    assert metric(text, "upload_server_active_sessions") == 0  # failed is not in progress
    assert metric(text, "upload_server_writers_alive") == 2
    assert (
        metric(
            text,
            "upload_server_request_duration_seconds_count",
            route="/upload/status",
            status="404",
        )
        == 1
    )
    assert (
        metric(
            text,
            "upload_server_request_duration_seconds_count",
            method="POST",
            route="/upload",
            status="201",
        )
        == 4
    )


def test_metrics_listen_serves_metrics_on_its_own_address_only(make_server):
    from upload_server.auth import hash_key

    port = free_port()
    server = make_server(
        ["--metrics-listen", f"127.0.0.1:{port}", "--metrics-auth", "true"],
        env={"UPLOAD_SERVER_API_KEYS": f"ops={hash_key('ops-key')}"},
    )
    side = f"http://127.0.0.1:{port}"
    scraped = requests.get(
        side + "/metrics", headers={"Authorization": "Bearer ops-key"}, timeout=10
    )
    assert scraped.status_code == 200
    assert metric(scraped.text, "upload_server_writers_alive") == 2
    assert requests.get(side + "/metrics", timeout=10).status_code == 401
    for path in ("/healthz", "/readyz"):
        assert requests.get(side + path, timeout=10).status_code == 200, path
    for path in ("/upload/status", "/files/", "/openapi.json", "/"):
        assert requests.get(side + path, timeout=10).status_code == 404, path
    assert requests.get(server.url("/metrics"), timeout=10).status_code == 404
    assert requests.get(server.url("/readyz"), timeout=10).status_code == 200


def test_large_patch_bodies_are_linked_into_the_spool_not_copied(server):
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("linking anonymous files needs Linux")
    tus = Tus(server.base)
    before = metric(
        requests.get(server.url("/metrics"), timeout=10).text,
        "upload_server_bytes_spooled_total",
        how="linked",
    )
    data = b"L" * (3 * MiB)
    url = tus.upload(data, chunk=3 * MiB)
    assert requests.get(url, timeout=10).content == data
    after = metric(
        requests.get(server.url("/metrics"), timeout=10).text,
        "upload_server_bytes_spooled_total",
        how="linked",
    )
    assert after - before == 3 * MiB


def test_readyz_goes_unready_when_writers_stop_answering(make_server):
    server = make_server()
    pids = server.writer_pids()
    assert requests.get(server.url("/readyz"), timeout=10).status_code == 200
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        response = requests.get(server.url("/readyz"), timeout=10)
        assert response.status_code == 503
        assert response.json()["ready"] is False
        assert "writers do not answer" in response.json()["problems"][0]
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: requests.get(server.url("/readyz"), timeout=10).status_code == 200)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    # replaced at once, but unready a moment longer while their sessions are reclaimed
    gone = requests.get(server.url("/readyz"), timeout=10)
    assert gone.status_code == 503, gone.text
    ready = wait_for(
        lambda: (
            (r := requests.get(server.url("/readyz"), timeout=10)).status_code == 200 and r.json()
        )
    )
    assert ready["writerRestarts"] == len(pids)
    assert not set(ready["writerPids"]) & set(pids)


def test_metrics_count_writer_and_manager_failures(make_server):
    server = make_server()

    def scraped(name: str, **labels: str) -> float:
        return metric(requests.get(server.url("/metrics"), timeout=10).text, name, **labels)

    assert scraped("upload_server_writer_restarts_total", reason="died") == 0
    assert (
        'upload_server_writer_restarts_total{reason="stalled"} 0.0'
        in requests.get(server.url("/metrics"), timeout=10).text
    )
    pid = server.writer_pids()[0]
    os.kill(pid, signal.SIGSTOP)  # its heartbeat goes silent: unresponsive, not replaced
    try:
        wait_for(lambda: scraped("upload_server_writers_unresponsive_total") == 1)
    finally:
        os.kill(pid, signal.SIGCONT)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: scraped("upload_server_writer_restarts_total", reason="died") == 1)
    ready = wait_for(
        lambda: (r := requests.get(server.url("/readyz"), timeout=10)).status_code == 200 and r
    ).json()
    os.kill(ready["managerPid"], signal.SIGKILL)
    wait_for(lambda: scraped("upload_server_manager_restarts_total") == 1, timeout=20)
    # the writers the Manager took with it are replaced as part of that, not counted as deaths
    assert scraped("upload_server_writer_restarts_total", reason="died") == 1
    assert scraped("upload_server_writer_restarts_total", reason="stalled") == 0


def test_readyz_answers_when_the_manager_is_stopped(make_server):
    server = make_server()
    manager = psutil.Process(requests.get(server.url("/readyz"), timeout=10).json()["managerPid"])
    manager.suspend()
    try:
        response = requests.get(server.url("/readyz"), timeout=15)
        assert response.status_code == 503
        assert any("Manager" in problem for problem in response.json()["problems"])
    finally:
        manager.resume()


def test_request_ids_and_json_logs(make_server):
    server = make_server(
        env={"UPLOAD_SERVER_LOG_FORMAT": "json", "UPLOAD_SERVER_LOG_LEVEL": "INFO"}
    )
    mine = requests.get(
        server.url("/upload/status"),
        params={"sessionID": "x" * 22},
        headers={"X-Request-ID": "trace-abc.123"},
        timeout=10,
    )
    assert mine.headers["X-Request-ID"] == "trace-abc.123"
    generated = requests.get(server.url("/healthz"), timeout=10).headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{16}", generated)
    hostile = requests.get(
        server.url("/healthz"), headers={"X-Request-ID": "a b\tc" * 50}, timeout=10
    ).headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{16}", hostile)

    def logged() -> list[dict]:
        lines = []
        for line in server.log().splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines

    entries = wait_for(lambda: [e for e in logged() if e.get("request_id") == "trace-abc.123"])
    access = [e for e in entries if e["logger"] == "upload_server.access"]
    assert access and access[0]["status"] == 404 and access[0]["path"] == "/upload/status"
    assert all({"time", "level", "logger", "message", "request_id"} <= set(e) for e in logged())
    assert any(e["message"].startswith("listening on http://") for e in logged())
    assert all(line.startswith("{") for line in server.log().splitlines() if line.strip())


def test_batch_status(server, files):
    a = server.post_file(files(100, seed=1)).json()["sessionID"]
    b = server.post_file(files(200, seed=2)).json()["sessionID"]
    server.wait_state(a, "completed")
    server.wait_state(b, "completed")
    response = requests.get(
        server.url("/upload/status"),
        params=[("sessionID", a), ("sessionID", b), ("sessionID", "z" * 22)],
        timeout=10,
    )
    assert response.status_code == 200
    body = response.json()
    assert [s["sessionID"] for s in body["sessions"]] == [a, b]
    assert body["notFound"] == ["z" * 22]
    listed = requests.get(
        server.url("/upload/status"), params={"sessionIDs": f"{a},{b}"}, timeout=10
    ).json()
    assert {s["totalBytes"] for s in listed["sessions"]} == {100, 200}


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json"])
def test_operational_endpoints_are_public_with_auth_on(make_server, path):
    from upload_server.auth import hash_key

    server = make_server(["--auth", "true", "--api-keys", f"a={hash_key('k')}"])
    assert requests.get(server.url(path), timeout=10).status_code == 200


def test_a_writer_that_keeps_dying_is_restarted_with_a_delay(make_server):
    server = make_server(env={"UPLOAD_SERVER_WRITERS": "1"})

    def ready() -> dict:
        return requests.get(server.url("/readyz"), timeout=10).json()

    pid = None
    for kill in range(4):
        previous = pid
        pid = wait_for(
            lambda previous=previous: (
                (r := ready())["writersAlive"] == 1
                and r["writerPids"][0] != previous
                and r["writerPids"][0]
            )
        )
        os.kill(pid, signal.SIGKILL)
        if kill < 3:
            continue
        time.sleep(0.5)
        assert ready()["ready"] is False  # the fourth death in a row: replaced after a delay
    assert wait_for(lambda: ready()["ready"], timeout=30)
    replacement = ready()["writerPids"][0]
    time.sleep(1.5)  # the delayed replacement must outlive the moment it was started
    after = ready()
    assert after["ready"] and after["writerPids"] == [replacement]
    assert after["writerRestarts"] == 4
