"""`--hook-format tusd` against real receivers: tusd's own example receiver (vendored, run as its
authors wrote it) and a receiver of ours for every hook type and answer field it does not use."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import free_port, wait_for
from .tus_http import Tus

pytestmark = pytest.mark.frontend

EXAMPLE = Path(__file__).parent / "vendor" / "tusd" / "hooks_http_server.py"
ALL_EVENTS = (
    "pre-create,post-create,post-receive,pre-finish,post-finish,pre-terminate,post-terminate"
)


def decoded_metadata(header: str) -> dict[str, str]:
    pairs = (item.strip().split(" ") for item in header.split(","))
    return {p[0]: base64.b64decode(p[1]).decode() if len(p) > 1 else "" for p in pairs}


@pytest.fixture
def example_receiver(tmp_path):
    """tusd's examples/hooks/http/server.py, listening where the test says."""
    port = free_port()
    output = tmp_path / "receiver.out"
    with open(output, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLE)],
            env={**os.environ, "HOOK_RECEIVER_PORT": str(port), "PYTHONUNBUFFERED": "1"},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"

    def answering() -> bool:
        with contextlib.suppress(requests.RequestException):
            return requests.get(url, timeout=1).status_code == 200
        return False

    wait_for(answering)
    yield url, output
    process.terminate()
    process.wait(10)


def test_tusds_example_receiver_decides_for_our_server(make_server, example_receiver):
    url, output = example_receiver
    server = make_server(["--hook-format", "tusd", "--hook-url", url, "--hook-events", ALL_EVENTS])
    tus = Tus(server.base)

    # no filename: rejected with the receiver's status, body and header
    refused = tus.create(5, note="x")
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"] == {"code": "upload_rejected", "message": "no filename provided"}
    assert refused.headers["X-Some-Header"] == "yes"

    # with one: the receiver picks the id and keeps only the filename (and a creation time)
    created = tus.create(11, filename="notes.txt", secret="drop me")
    assert created.status_code == 201, created.text
    location = created.headers["Location"]
    upload_id = location.rsplit("/", 1)[1]
    assert upload_id.startswith("prefix-") and len(upload_id) == len("prefix-") + 36
    metadata = decoded_metadata(tus.head(location).headers["Upload-Metadata"])
    assert set(metadata) == {"filename", "creation_time"} and metadata["filename"] == "notes.txt"

    done = tus.patch(location, 0, b"hello world")
    assert done.status_code == 204, done.text
    status = server.wait_state(upload_id, "completed")
    assert (server.upload_dir / status["storedAs"]).read_bytes() == b"hello world"
    assert requests.get(location, timeout=10).content == b"hello world"
    # its post-finish handler read ID, Size and Storage from our body
    finished = f"Upload {upload_id} (11 bytes) is finished"
    wait_for(lambda: finished in output.read_text(), timeout=20)
    assert str(server.upload_dir.absolute() / "notes.txt") in output.read_text()


class Receiver:
    """A tusd-style receiver: records every hook, answers by the `answers` functions."""

    def __init__(self) -> None:
        self.hooks: list[dict[str, Any]] = []
        self.answers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.hooks.append(request)
                answer = owner.answers.get(request["Type"], lambda r: {})(request)
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def of(self, hook_type: str, upload_id: str | None = None) -> list[dict[str, Any]]:
        return [
            h
            for h in list(self.hooks)
            if h["Type"] == hook_type
            and (upload_id is None or h["Event"]["Upload"]["ID"] == upload_id)
        ]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver():
    hooks = Receiver()
    yield hooks
    hooks.close()


@pytest.fixture
def tusd_server(make_server, receiver):
    return make_server(
        ["--hook-format", "tusd", "--hook-url", receiver.url, "--hook-events", ALL_EVENTS]
    )


def test_the_request_body_is_tusds(tusd_server, receiver):
    tus = Tus(tusd_server.base)
    location = tus.new(5, filename="a.txt", empty="")
    upload_id = location.rsplit("/", 1)[1]
    pre = receiver.of("pre-create")[-1]
    assert pre["Event"]["Upload"] == {
        "ID": "",
        "Size": 5,
        "SizeIsDeferred": False,
        "Offset": 0,
        "MetaData": {"filename": "a.txt", "empty": ""},
        "IsPartial": False,
        "IsFinal": False,
        "PartialUploads": None,
        "Storage": None,
    }
    request = pre["Event"]["HTTPRequest"]
    assert request["Method"] == "POST" and request["URI"] == "/files/"
    assert request["RemoteAddr"].startswith("127.0.0.1")
    assert request["Header"]["Upload-Length"] == ["5"]
    assert tus.patch(location, 0, b"hello").status_code == 204
    wait_for(lambda: receiver.of("post-finish", upload_id), timeout=20)
    for hook_type in ("post-create", "post-receive", "pre-finish", "post-finish"):
        assert receiver.of(hook_type, upload_id), hook_type
    finish = receiver.of("post-finish", upload_id)[-1]["Event"]["Upload"]
    assert finish["Offset"] == 5 and finish["Storage"]["Type"] == "filestore"
    assert finish["Storage"]["Path"].endswith("a.txt")
    order = [h["Type"] for h in receiver.hooks if h["Event"]["Upload"]["ID"] == upload_id]
    assert order.index("pre-finish") < order.index("post-finish")
    # a deferred length, and a concatenation's parts
    deferred = tus.create(headers={"Upload-Defer-Length": "1"})
    assert deferred.status_code == 201
    assert receiver.of("pre-create")[-1]["Event"]["Upload"]["SizeIsDeferred"] is True
    part = tus.create(3, headers={"Upload-Concat": "partial"})
    assert receiver.of("pre-create")[-1]["Event"]["Upload"]["IsPartial"] is True
    assert tus.patch(part.headers["Location"], 0, b"abc").status_code == 204
    final = tus.create(headers={"Upload-Concat": f"final;{part.headers['Location']}"})
    assert final.status_code == 201, final.text
    info = receiver.of("pre-create")[-1]["Event"]["Upload"]
    assert info["IsFinal"] is True
    assert info["PartialUploads"] == [part.headers["Location"].rsplit("/", 1)[1]]


def test_pre_create_answers(tusd_server, receiver):
    tus = Tus(tusd_server.base)
    existing = tus.new(1, filename="first.bin").rsplit("/", 1)[1]

    def pre_create(request: dict[str, Any]) -> dict[str, Any]:
        name = request["Event"]["Upload"]["MetaData"].get("filename", "")
        return {
            "quota.bin": {
                "RejectUpload": True,
                "HTTPResponse": {
                    "StatusCode": 403,
                    "Body": '{"reason": "over quota"}',
                    "Header": {"Content-Type": "application/json", "X-Quota": "0"},
                },
            },
            "plain.bin": {"RejectUpload": True},
            "taken.bin": {"ChangeFileInfo": {"ID": existing}},
            "bad-id.bin": {"ChangeFileInfo": {"ID": "../../etc"}},
            "unicode-id.bin": {"ChangeFileInfo": {"ID": "é" * 20}},
            "own-id.bin": {"ChangeFileInfo": {"ID": "my-own-upload-id-0001"}},
            "header.bin": {"HTTPResponse": {"Header": {"X-From-Hook": "hello"}}},
            "not-json.bin": {"HTTPResponse": "nope"},
        }.get(name, {})

    receiver.answers["pre-create"] = pre_create
    quota = tus.create(5, filename="quota.bin")
    assert quota.status_code == 403 and quota.json() == {"reason": "over quota"}
    assert quota.headers["X-Quota"] == "0"
    plain = tus.create(5, filename="plain.bin")
    assert plain.status_code == 400 and plain.json()["error"]["code"] == "upload_rejected"
    taken = tus.create(5, filename="taken.bin")
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "upload_id_taken"
    bad = tus.create(5, filename="bad-id.bin")
    assert bad.status_code == 502 and bad.json()["error"]["code"] == "hook_bad_answer"
    unicode_id = tus.create(5, filename="unicode-id.bin")
    assert unicode_id.status_code == 502, unicode_id.text
    garbled = tus.create(5, filename="not-json.bin")
    assert garbled.status_code == 502 and garbled.json()["error"]["code"] == "hook_bad_answer"
    own = tus.create(5, filename="own-id.bin")
    assert own.status_code == 201 and own.headers["Location"].endswith("/my-own-upload-id-0001")
    again = tus.create(5, filename="own-id.bin")
    assert again.status_code == 409, again.text
    with_header = tus.create(5, filename="header.bin")
    assert with_header.status_code == 201 and with_header.headers["X-From-Hook"] == "hello"
    # the seed API asks the same hook
    form = requests.post(
        tusd_server.url("/upload"), files={"file": ("quota.bin", b"12345")}, timeout=30
    )
    assert form.status_code == 403 and form.json() == {"reason": "over quota"}


def test_pre_finish_shapes_the_completing_response(tusd_server, receiver):
    receiver.answers["pre-finish"] = lambda r: {
        "HTTPResponse": {"StatusCode": 200, "Body": "thanks", "Header": {"X-Finished": "yes"}}
    }
    tus = Tus(tusd_server.base)
    location = tus.new(6, filename="two-parts.bin")
    first = tus.patch(location, 0, b"abc")
    assert first.status_code == 204 and "X-Finished" not in first.headers
    last = tus.patch(location, 3, b"def")
    assert last.status_code == 200 and last.text == "thanks" and last.headers["X-Finished"] == "yes"
    assert last.headers["Upload-Offset"] == "6"
    # creation-with-upload that completes the upload at once
    whole = tus.create(3, data=b"xyz", filename="whole.bin")
    assert whole.status_code == 200 and whole.headers["X-Finished"] == "yes"
    assert whole.headers["Location"]


def test_pre_terminate_may_refuse(tusd_server, receiver):
    tus = Tus(tusd_server.base)
    keep = tus.new(5, filename="keep.bin")
    drop = tus.new(5, filename="drop.bin")

    def pre_terminate(request: dict[str, Any]) -> dict[str, Any]:
        if request["Event"]["Upload"]["MetaData"]["filename"] != "keep.bin":
            return {}
        return {"RejectTermination": True, "HTTPResponse": {"Body": "this one stays"}}

    receiver.answers["pre-terminate"] = pre_terminate
    refused = tus.delete(keep)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"] == {"code": "termination_rejected", "message": "this one stays"}
    assert tus.head(keep).status_code == 200
    seed = requests.post(
        tusd_server.url("/upload/terminate"),
        params={"sessionID": keep.rsplit("/", 1)[1]},
        timeout=30,
    )
    assert seed.status_code == 400
    assert tus.delete(drop).status_code == 204
    drop_id = drop.rsplit("/", 1)[1]
    wait_for(lambda: receiver.of("post-terminate", drop_id), timeout=20)
    request = receiver.of("pre-terminate", drop_id)[-1]["Event"]["HTTPRequest"]
    assert request["Method"] == "DELETE"


def test_post_receive_may_stop_the_upload(tusd_server, receiver):
    receiver.answers["post-receive"] = lambda r: {
        "StopUpload": r["Event"]["Upload"]["MetaData"].get("filename") == "stop.bin"
    }
    tus = Tus(tusd_server.base)
    location = tus.new(3_000_000, filename="stop.bin")
    upload_id = location.rsplit("/", 1)[1]
    first = tus.patch(location, 0, b"x" * 1_000_000)
    assert first.status_code in (204, 400), first.text
    if first.status_code == 400:
        assert first.json()["error"]["code"] == "upload_stopped"
    assert tusd_server.wait_state(upload_id, "terminated", timeout=20)["terminated"]
    assert tus.patch(location, 1_000_000, b"y" * 10).status_code in (404, 410)
    wait_for(lambda: receiver.of("post-terminate", upload_id), timeout=20)
    # another upload is not stopped
    other = tus.new(4, filename="go-on.bin")
    assert tus.patch(other, 0, b"abcd").status_code == 204


def test_a_receiver_out_of_reach_fails_creation_with_503(make_server):
    dead = f"http://127.0.0.1:{free_port()}/"
    server = make_server(["--hook-format", "tusd", "--hook-url", dead])
    refused = Tus(server.base).create(5, filename="a.bin")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "hook_unavailable"


def test_tusd_only_events_need_the_tusd_format(tmp_path):
    result = subprocess.run(
        [
            *(sys.executable, "-m", "upload_server.cli", "--upload-dir", str(tmp_path)),
            *("--hook-url", "http://127.0.0.1:9/", "--hook-events", "pre-finish"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "need --hook-format tusd" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_post_finish_of_a_seed_upload_is_not_held(tusd_server, receiver):
    started = time.monotonic()
    form = requests.post(tusd_server.url("/upload"), files={"file": ("s.bin", b"abc")}, timeout=30)
    assert form.status_code == 201
    session_id = form.json()["sessionID"]
    wait_for(lambda: receiver.of("post-finish", session_id), timeout=20)
    assert time.monotonic() - started < 5


def test_a_python_callable_gets_tusds_body_and_its_dict_is_the_answer(tmp_path):
    """`--hook-callable` (or `create_app(hook=...)`) in the tusd format, in-process."""
    from upload_server.config import Config
    from upload_server.hooks import Hooks
    from upload_server.hooks_tusd import HookAnswered
    from upload_server.sessions.record import Session

    seen: list[tuple[str, dict]] = []

    def hook(hook_type: str, body: dict) -> dict:
        seen.append((hook_type, body))
        if hook_type == "pre-create":
            return {"RejectUpload": True, "HTTPResponse": {"StatusCode": 451, "Body": "no"}}
        return {"StopUpload": True}

    config = Config.load(environ={}, upload_dir=str(tmp_path), hook_format="tusd")
    hooks = Hooks(config, hook)
    stopped: list[str] = []
    hooks.on_stop = stopped.append
    try:
        with pytest.raises(HookAnswered) as refused:
            hooks.pre_create({"totalBytes": 3, "metadata": {"filename": "x"}})
        assert (refused.value.status, refused.value.message) == (451, "no")
        assert seen[0][1]["Event"]["Upload"]["MetaData"] == {"filename": "x"}
        hooks.emit("progress", Session("a-session-id-000001", "tus", "x", 1024, 0))
        wait_for(lambda: stopped == ["a-session-id-000001"])
        assert seen[-1][0] == "post-receive"
    finally:
        hooks.stop(grace=0)
