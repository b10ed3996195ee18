"""Trust: authentication, ownership, tokens, declared digests, hooks, limits, proxies."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from upload_server.auth import hash_key, issue_token
from upload_server.hooks import verify_signature

from .conftest import MiB, free_port, sha256_file, wait_for
from .tus_http import TUS, Tus, metadata

pytestmark = (
    pytest.mark.frontend
)  # credentials, hooks and clients do not depend on how writers start

ALICE, BOB = "alice-secret-key", "bob-secret-key"
SECRET = "token-signing-secret-of-32-bytes-or-more"


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


@pytest.fixture
def secure(make_server):
    keys = f"alice={hash_key(ALICE)},bob={hash_key(BOB)}"
    return make_server(["--auth", "true", "--api-keys", keys, "--token-secret", SECRET])


def _tus(server, credential: str) -> Tus:
    client = Tus(server.base)
    client.http.headers.update(bearer(credential))
    return client


def test_upload_tokens(secure):
    good = issue_token(SECRET, "carol", 60, max_size=1000, filetype="text/plain")
    client = _tus(secure, good)
    url = client.upload(b"x" * 1000, filename="ok.txt", filetype="text/plain")
    status = requests.get(
        secure.url("/upload/status"),
        params={"sessionID": url.rsplit("/", 1)[1]},
        headers=bearer(good),
        timeout=10,
    )
    assert status.json()["completed"] is True
    # a download link carries the token in the query
    assert requests.get(url, params={"access_token": good}, timeout=10).content == b"x" * 1000

    assert client.create(1001, filetype="text/plain").status_code == 413
    assert client.create(10, filetype="image/png").status_code == 403
    with_seed = requests.post(
        secure.url("/upload"),
        headers=bearer(good),
        timeout=10,
        files={"file": ("big.txt", b"y" * 2000, "text/plain")},
    )
    assert with_seed.status_code == 413

    expired = issue_token(SECRET, "carol", -60)  # past the 30 s leeway
    response = _tus(secure, expired).create(10)
    assert response.status_code == 401 and response.json()["error"]["code"] == "token_expired"

    prefix, claims, signature = good.split(".")
    tampered = f"{prefix}.{claims[:-2]}AA.{signature}"
    response = _tus(secure, tampered).create(10)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_token"
    forged = issue_token("another-secret", "carol", 60)
    assert _tus(secure, forged).create(10).status_code == 401

    for claims in (
        {"sub": "", "exp": 9e9},
        {"sub": 5, "exp": 9e9},
        {"sub": "e", "exp": "soon"},
        {"sub": "e", "exp": 9e9, "max": -1},
        {"sub": "e", "exp": 9e9, "max": "10"},
    ):
        body = "ust1." + base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        mac = hmac.new(SECRET.encode(), body.encode(), hashlib.sha256).digest()
        signed = body + "." + base64.urlsafe_b64encode(mac).decode().rstrip("=")
        response = _tus(secure, signed).create(10)
        assert response.status_code == 401, claims
        assert response.json()["error"]["code"] == "invalid_token"

    named = issue_token(SECRET, "dave", 60, filename="report.pdf")
    assert _tus(secure, named).create(10, filename="other.pdf").status_code == 403
    assert _tus(secure, named).create(10, filename="report.pdf").status_code == 201


def test_auth_needs_credentials_configured(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "upload_server.cli",
            "--auth",
            "true",
            "--upload-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--auth needs API keys" in result.stderr

    missing = subprocess.run(
        [
            *(sys.executable, "-m", "upload_server.cli", "--auth", "true"),
            *("--upload-dir", str(tmp_path), "--api-keys-file", str(tmp_path / "nope.txt")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "cannot read the API keys file" in missing.stderr


def test_keygen_appends_a_usable_keys_file_line(make_server, tmp_path):
    import subprocess
    import sys

    keys = tmp_path / "keys.txt"
    made = subprocess.run(
        [sys.executable, "-m", "upload_server.cli", "keygen", "erin"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    keys.write_text(made.stdout)  # as `upload-server keygen erin >> keys.txt` would
    key = made.stderr.strip().rsplit(" ", 1)[1]
    assert key not in made.stdout
    server = make_server(["--auth", "true", "--api-keys-file", str(keys)])
    assert _tus(server, key).create(10).status_code == 201


# -- integrity --------------------------------------------------------------------------------


def test_declared_digest_seed(server, files):
    source = files(2 * MiB + 1, seed=70)
    digest = sha256_file(source)
    with open(source, "rb") as handle:
        good = requests.post(
            server.url("/upload"),
            files={"file": ("good.bin", handle)},
            data={"sha256": digest},
            timeout=30,
        )
    status = server.wait_state(good.json()["sessionID"], "completed", "failed")
    assert status["state"] == "completed" and status["sha256"] == digest
    with open(source, "rb") as handle:
        bad = requests.post(
            server.url("/upload"),
            files={"file": ("bad.bin", handle)},
            data={"sha256": "0" * 64},
            timeout=30,
        )
    status = server.wait_state(bad.json()["sessionID"], "completed", "failed")
    assert status["state"] == "failed" and status["error"]["code"] == "digest_mismatch"
    assert status["storedAs"] is None and not (server.upload_dir / "bad.bin").exists()
    malformed = requests.post(
        server.url("/upload"), files={"file": ("m.bin", b"abc")}, data={"sha256": "xyz"}, timeout=30
    )
    assert malformed.status_code == 400


def test_declared_digest_tus(server):
    tus = Tus(server.base)
    data = b"integrity" * 1000
    digest = hashlib.sha256(data).hexdigest()
    url = tus.new(len(data), filename="t-good.bin", sha256=digest)
    assert tus.patch(url, 0, data).status_code == 204
    head = tus.head(url)
    assert head.headers["Repr-Digest"].startswith("sha-256=:")
    assert server.status(url.rsplit("/", 1)[1])["sha256"] == digest

    url = tus.new(len(data), filename="t-bad.bin", sha256="1" * 64)
    refused = tus.patch(url, 0, data)  # the client must learn it, or it would re-send forever
    assert refused.status_code == 460, refused.text
    assert refused.json()["error"]["code"] == "digest_mismatch"
    status = server.status(url.rsplit("/", 1)[1])
    assert status["state"] == "failed" and status["error"]["code"] == "digest_mismatch"
    assert requests.get(url, timeout=10).status_code == 409
    assert not (server.upload_dir / "t-bad.bin").exists()
    assert tus.head(url).headers["Upload-Offset"] == "0"  # a retry starts over

    whole = tus.create(len(data), data=data, headers={"Upload-Metadata": metadata(sha256="2" * 64)})
    assert whole.status_code == 460 and "Location" not in whole.headers

    import base64

    header = "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"
    response = tus.create(len(data), headers={"Repr-Digest": header})
    assert tus.patch(response.headers["Location"], 0, data).status_code == 204
    assert tus.create(5, headers={"Repr-Digest": "md5=:AAAA:"}).status_code == 400


# -- hooks ------------------------------------------------------------------------------------


class Receiver:
    """A real local HTTP server that records webhook deliveries."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict, str, bytes]] = []
        self.fail_next = 0
        self.reject_filenames: set[str] = set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                payload = json.loads(body)
                receiver.events.append(
                    (payload["event"], payload, self.headers["Upload-Server-Signature"], body)
                )
                if receiver.fail_next > 0 and payload["event"] == "post-finish":
                    receiver.fail_next -= 1
                    self.send_response(500)
                    self.end_headers()
                    return
                name = payload["upload"].get("filename") or ""
                if payload["event"] == "pre-create" and name in receiver.reject_filenames:
                    answer = json.dumps({"message": f"{name} is not welcome"}).encode()
                    self.send_response(422)
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def of(self, kind: str) -> list[dict]:
        return [payload for event, payload, _, _ in self.events if event == kind]


@pytest.fixture
def receiver():
    instance = Receiver()
    yield instance
    instance.httpd.shutdown()


def test_webhooks(make_server, receiver, files):
    server = make_server(
        [
            "--hook-url",
            f"http://127.0.0.1:{receiver.port}/hook",
            "--hook-secret",
            "hook-key",
            "--max-bytes-per-second",
            "2MiB",
        ]
    )
    receiver.fail_next = 2  # post-finish fails twice, then succeeds: retried with backoff
    source = files(5 * MiB, seed=71)
    session_id = server.post_file(source, filename="hooked.bin").json()["sessionID"]
    server.wait_state(session_id, "completed")
    finished = wait_for(
        lambda: (
            receiver.of("post-finish")
            if len([e for e in receiver.events if e[0] == "post-finish"]) >= 3
            else None
        ),
        timeout=30,
    )
    assert finished[-1]["upload"]["sessionID"] == session_id
    assert finished[-1]["upload"]["sha256"] == sha256_file(source)
    assert receiver.of("pre-create")[0]["upload"]["filename"] == "hooked.bin"
    assert receiver.of("post-create")[0]["upload"]["sessionID"] == session_id
    progress = [p for p in receiver.of("progress") if p["upload"]["sessionID"] == session_id]
    assert len(progress) >= 2
    for _, payload, signature, body in receiver.events:
        assert verify_signature("hook-key", body, signature), payload["event"]

    receiver.reject_filenames.add("evil.exe")
    refused = server.post_file(files(10), filename="evil.exe")
    assert refused.status_code == 422
    assert refused.json()["error"]["message"] == "evil.exe is not welcome"
    tus = Tus(server.base)
    assert tus.create(10, filename="evil.exe").status_code == 422

    url = tus.new(10, filename="short-lived.bin")
    tus.delete(url)
    terminated = wait_for(lambda: receiver.of("post-terminate"))
    assert terminated[0]["upload"]["terminated"] is True


def test_progress_hooks_are_throttled(make_server, receiver, files):
    server = make_server(
        [
            "--hook-url",
            f"http://127.0.0.1:{receiver.port}/",
            "--max-bytes-per-second",
            "2MiB",
            "--chunk-size",
            "256KiB",
        ]
    )
    session_id = server.post_file(files(6 * MiB, seed=72)).json()["sessionID"]
    server.wait_state(session_id, "completed")
    times = [
        time.mktime(time.strptime(p["time"][:19], "%Y-%m-%dT%H:%M:%S"))
        for p in receiver.of("progress")
    ]
    assert 2 <= len(times) <= 5  # about 3 seconds of writing, one report a second at most


@contextlib.contextmanager
def app_with_hook(tmp_path, hook):
    """The app in this process with a Python hook callable, as an embedding application has it."""
    import falcon.testing

    from upload_server import create_app
    from upload_server.config import Config

    app = create_app(Config.load(environ={}, upload_dir=str(tmp_path), writers=1), hook=hook)
    try:
        yield falcon.testing.TestClient(app)
    finally:
        app.runtime.close()


def test_callable_hook_can_reject(tmp_path):
    from upload_server.hooks import HookRejected

    seen: list[str] = []

    def hook(event: str, payload: dict) -> None:
        seen.append(event)
        if event == "pre-create" and payload["upload"]["totalBytes"] > 100:
            raise HookRejected("too big for this tenant", status=403)

    with app_with_hook(tmp_path, hook) as client:
        refused = client.simulate_post("/files/", headers={**TUS, "Upload-Length": "101"})
        assert refused.status_code == 403
        assert refused.json["error"]["message"] == "too big for this tenant"
        accepted = client.simulate_post("/files/", headers={**TUS, "Upload-Length": "5"})
        assert accepted.status_code == 201
        wait_for(lambda: "post-create" in seen)


def test_a_failing_hook_callable_refuses_with_503(tmp_path):
    def hook(event: str, payload: dict) -> None:
        raise RuntimeError("the application's bug")

    with app_with_hook(tmp_path, hook) as client:
        refused = client.simulate_post("/files/", headers={**TUS, "Upload-Length": "5"})
        assert refused.status_code == 503
        assert refused.json["error"]["code"] == "hook_failed"


def test_undelivered_hooks_are_counted_at_shutdown(tmp_path, caplog):
    from upload_server.config import Config
    from upload_server.hooks import Hooks

    config = Config.load(
        environ={},
        upload_dir=str(tmp_path),
        hook_url=f"http://127.0.0.1:{free_port()}/",
        hook_timeout="1",
    )
    from upload_server.sessions.record import Session

    hooks = Hooks(config)
    hooks.emit("post-finish", Session("s1", "seed", "f.bin", 1024, 0))
    wait_for(lambda: hooks.stats.retried >= 1)  # the receiver is down: waiting to retry
    hooks.stop(grace=0)
    assert hooks.stats.dropped == 1
    assert "post-finish hook of upload s1 was not delivered" in caplog.text


# -- limits -----------------------------------------------------------------------------------


def test_a_refused_form_of_several_files_stores_none_of_them(make_server):
    """All or nothing: with room for two more sessions, a form of three files is refused whole,
    and one of two is taken whole."""
    server = make_server(["--max-sessions-per-owner", "2"])
    records = server.upload_dir / ".upload_server" / "sessions"
    before = sorted(p.name for p in records.iterdir())
    form = [("file", (f"f{i}.bin", b"x" * (i + 1))) for i in range(3)]
    refused = requests.post(server.url("/upload"), files=form, timeout=30)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_sessions"
    time.sleep(0.5)  # a stored session would be draining by now
    assert sorted(p.name for p in records.iterdir()) == before
    assert not [p for p in server.upload_dir.iterdir() if p.name.startswith("f")]
    assert not list((server.upload_dir / ".upload_server" / "spool").iterdir())
    taken = requests.post(server.url("/upload"), files=form[:2], timeout=30)
    assert taken.status_code == 201, taken.text
    for session_id in taken.json()["sessionIDs"]:
        assert server.wait_state(session_id, "completed")["completed"]


def test_header_size_limit_is_a_json_431(make_server):
    server = make_server(["--max-header-size", "8KiB"])
    response = requests.get(
        server.url("/upload/status"), headers={"X-Big": "a" * 16384}, timeout=10
    )
    assert response.status_code == 431
    assert response.json()["error"]["code"]


def test_slow_client_is_dropped_while_others_continue(make_server, files):
    server = make_server(["--idle-timeout", "2s"])
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall(b"POST /files/ HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n")
    started = time.monotonic()
    source = files(2 * MiB, seed=73)
    status = server.wait_state(server.post_file(source).json()["sessionID"], "completed")
    assert sha256_file(server.upload_dir / status["storedAs"]) == sha256_file(source)
    slow.settimeout(15)
    assert slow.recv(1024) == b""  # closed by the server
    assert 1.5 <= time.monotonic() - started <= 10
    slow.close()


def test_trusted_proxy_sets_public_urls(make_server, tmp_path):
    plain = make_server(upload_dir=tmp_path / "plain")
    response = Tus(plain.base).create(
        5, headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}
    )
    assert response.headers["Location"].startswith(plain.base + "/files/")

    proxied = make_server(["--trusted-proxy", "127.0.0.1"])
    response = Tus(proxied.base).create(
        5, headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "uploads.example.com"}
    )
    assert response.headers["Location"].startswith("https://uploads.example.com/files/")
