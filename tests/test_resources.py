"""The resources' own decisions and their error answers, in-process and fast.

`build_app` around the real `SessionService`: its live view over a plain dict, the file session store and
local storage in `tmp_path`, and `StandInWriters` for the writer pool, which stores an append
and applies a command at once. No server, no process: what a request is answered before (or
without) a writer's own work is decided here, so it is tested here. What needs waitress, a
writer, real clients or a crash stays in the process-level modules.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import falcon.testing
import pytest
import waitress.buffers
import waitress.channel
import waitress.wasyncore

from upload_server import metrics, waitress_patches, waitress_server
from upload_server.app import build_app
from upload_server.auth import hash_key, issue_token
from upload_server.config import Config
from upload_server.hooks import Hooks
from upload_server.layout import Layout
from upload_server.service import SessionService
from upload_server.sessions import record as states
from upload_server.sessions.live import LiveSessions
from upload_server.sessions.record import Session
from upload_server.sessions.store import FileSessionStore
from upload_server.storage import LocalStorage
from workers.messages import Append, Concat, Event, Reply

from .conftest import free_port
from .tus_http import OCTET, TUS, metadata

pytestmark = pytest.mark.frontend  # no writer process: the start method does not matter

MiB = 1024 * 1024
ALICE, BOB = "alice-secret-key", "bob-secret-key"
_STATES_OF = {"pause": states.PAUSED, "terminate": states.TERMINATED}


class StandInWriters:
    """What `SessionService` calls on the writer pool, answered at once in this process, as a writer
    would when all goes well: an append's segment is moved into the data and counted, an upload
    whose bytes are all in is published, a command sets the state. It checks nothing itself:
    the checks under test are the front end's."""

    on_event: Callable[[Event], None] | None = None
    on_record: Callable[[dict[str, Any]], None] | None = None

    def __init__(self, live: dict[str, Any], layout: Layout) -> None:
        self.live = live
        self.layout = layout
        self.drained: list[str] = []
        self._ids = itertools.count(1)

    def assign(self) -> int:
        return 0

    def next_request_id(self) -> int:
        return next(self._ids)

    def followed(self, key: tuple[int, int]) -> int | None:
        return None  # no writer copies a body while it arrives here

    def drain(self, session: Session) -> None:
        self.drained.append(session.id)

    def forget(self, session_id: str) -> None:
        pass

    def append(self, session: Session, message: Append, timeout: float) -> Reply:
        record = Session.from_dict(self.live[message.session_id])
        if message.segment:
            with open(self.layout.partial(record.id), "ab") as data:
                data.write(Path(message.segment).read_bytes())
            os.unlink(message.segment)
        record.bytes_written += message.length
        if message.declare_length is not None:
            record.total_bytes = message.declare_length
        if record.bytes_written == record.total_bytes:
            self._publish(record)
        return self._saved(message.request_id, record)

    def concat(self, session: Session, message: Concat, timeout: float) -> Reply:
        record = Session.from_dict(self.live[message.session_id])
        with open(self.layout.partial(record.id), "wb") as data:
            for part in message.parts:
                data.write(self.layout.partial(part).read_bytes())
        record.bytes_written = record.total_bytes or 0
        self._publish(record)
        return self._saved(message.request_id, record)

    def control(self, session: Session, action: str, timeout: float = 30.0, **args: Any) -> Reply:
        record = Session.from_dict(self.live[session.id])
        resumed = states.QUEUED if record.protocol == states.SEED else states.WAITING
        record.state = _STATES_OF.get(action, resumed)
        if record.is_final:
            self._tell("terminated", record)
        return self._saved(self.next_request_id(), record)

    def fail(self, session_id: str) -> None:
        """As a writer does when a write fails: the record says so, then the event."""
        record = Session.from_dict(self.live[session_id])
        record.state = states.FAILED
        record.set_error("io_error", "a stand-in failure")
        self.live[session_id] = record.to_dict()
        self._tell("failed", record)

    def _publish(self, record: Session) -> None:
        data = self.layout.partial(record.id)
        data.touch()
        record.sha256 = hashlib.sha256(data.read_bytes()).hexdigest()
        record.location = record.filename
        os.replace(data, self.layout.root / record.location)
        record.state = states.COMPLETED
        self._tell("completed", record)

    def _saved(self, request_id: int, record: Session) -> Reply:
        self.live[record.id] = record.to_dict()
        if self.on_record is not None:  # as the monitor does with every answer
            self.on_record(record.to_dict())
        return Reply(request_id, record.to_dict())

    def _tell(self, kind: str, record: Session) -> None:
        if self.on_event is not None:
            self.on_event(Event(kind, record.to_dict()))


class Served:
    """The app with its in-process service, and small helpers for the requests the tests make."""

    def __init__(self, root: Path, **settings: Any) -> None:
        self.config = Config.load(environ={}, upload_dir=str(root), **settings)
        self.layout = Layout(root)
        self.layout.create()
        self.live: dict[str, Any] = {}
        self.writers = StandInWriters(self.live, self.layout)
        self.service = SessionService(
            self.config,
            self.layout,
            LiveSessions(self.live),
            FileSessionStore(self.layout.sessions),
            LocalStorage(self.layout),
            self.writers,  # type: ignore[arg-type]
            Hooks(self.config),
        )
        self.client = NoServerErrors(
            build_app(
                self.config, self.service, NoProcesses(self.config, self.layout, self.service)
            )
        )

    def session(self, session_id: str) -> Session:
        return Session.from_dict(self.live[session_id])

    def set_state(self, session_id: str, state: str) -> None:
        record = self.session(session_id)
        record.state = state
        self.live[session_id] = record.to_dict()

    # -- seed API

    def post_file(
        self, data: bytes = b"hello", headers: dict[str, str] | None = None
    ) -> falcon.testing.Result:
        body, content_type = _multipart(("file", ("a.bin", data)))
        return self.client.simulate_post(
            "/upload", body=body, headers={"Content-Type": content_type, **(headers or {})}
        )

    def seed_session(self, headers: dict[str, str] | None = None) -> str:
        created = self.post_file(headers=headers)
        assert created.status_code == 201, created.text
        return created.json["sessionID"]

    # -- tus

    def create(
        self, length: int | None = None, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> falcon.testing.Result:
        h = {**TUS, **({"Upload-Length": str(length)} if length is not None else {})}
        if body:
            h["Content-Type"] = OCTET
        return self.client.simulate_post("/files/", headers={**h, **(headers or {})}, body=body)

    def new(self, length: int | None, headers: dict[str, str] | None = None) -> str:
        created = self.create(length, headers)
        assert created.status_code == 201, created.text
        return created.headers["Location"]

    def patch(
        self, url: str, offset: int | str, data: bytes, headers: dict[str, str] | None = None
    ) -> falcon.testing.Result:
        h = {**TUS, "Upload-Offset": str(offset), "Content-Type": OCTET, **(headers or {})}
        return self.client.simulate_patch(_path(url), headers=h, body=data)

    def head(self, url: str, headers: dict[str, str] | None = None) -> falcon.testing.Result:
        return self.client.simulate_head(_path(url), headers={**TUS, **(headers or {})})

    def upload(self, data: bytes, headers: dict[str, str] | None = None) -> str:
        url = self.new(len(data), headers)
        done = self.patch(url, 0, data, headers=_auth_of(headers))
        assert done.status_code == 204, done.text
        return url


class NoServerErrors(falcon.testing.TestClient):
    """A test client for which any 500 fails the test: every refusal here has its own answer."""

    def simulate_request(self, *args: Any, **kwargs: Any) -> falcon.testing.Result:
        result = super().simulate_request(*args, **kwargs)
        assert result.status_code != 500, result.text
        return result


class NoProcesses:
    """The health source: what `/readyz` and `/metrics` read, with no process behind the app."""

    pool = directory = manager = None
    manager_restarts = 0
    started = 0.0

    def __init__(
        self, config: Config, layout: Layout, service: SessionService | None = None
    ) -> None:
        self.config = config
        self.layout = layout
        self.service = service  # as the runtime's: what a scrape must not walk


def _path(url: str) -> str:
    return urllib.parse.urlsplit(url).path


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def _auth_of(headers: dict[str, str] | None) -> dict[str, str]:
    return {k: v for k, v in (headers or {}).items() if k == "Authorization"}


def _multipart(*fields: tuple[str, tuple[str, bytes] | bytes]) -> tuple[bytes, str]:
    """A form of (name, value) fields, in order; a value (filename, data) is a file."""
    boundary = "testboundary7f3a"
    out = b""
    for name, value in fields:
        if isinstance(value, tuple):
            filename, data = value
            head = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            head += "Content-Type: application/octet-stream\r\n"
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"\r\n', value
        out += f"--{boundary}\r\n{head}\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _id(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[1]


def assert_error(response: falcon.testing.Result, status: int, code: str | None = None) -> dict:
    """A JSON error answer of `status` (and `code`): `{"error": {"code", "message", ...}}`."""
    assert response.status_code == status, response.text
    if response.text:  # a HEAD answer has no body
        assert response.headers["Content-Type"].startswith("application/json")
        error = response.json["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str)
        assert "Traceback" not in response.text
        if code is not None:
            assert error["code"] == code
        return error
    return {}


@pytest.fixture
def served(tmp_path: Path) -> Served:
    return Served(tmp_path / "uploads")


@pytest.fixture
def make_served(tmp_path: Path) -> Callable[..., Served]:
    names = itertools.count()
    return lambda **settings: Served(tmp_path / f"uploads-{next(names)}", **settings)


# -- tus: capabilities and creation -----------------------------------------------------------


def test_options_advertises_the_protocol(served):
    response = served.client.simulate_options("/files/")
    assert response.status_code == 204
    assert response.headers["Tus-Version"] == "1.0.0"
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert int(response.headers["Tus-Max-Size"]) == served.config.max_upload_size
    extensions = set(response.headers["Tus-Extension"].split(","))
    assert {
        "creation",
        "creation-with-upload",
        "creation-defer-length",
        "expiration",
        "checksum",
        "termination",
        "concatenation",
    } <= extensions
    algorithms = set(response.headers["Tus-Checksum-Algorithm"].split(","))
    assert {"sha1", "md5", "sha256", "sha512"} <= algorithms


@pytest.mark.parametrize("method", ["POST", "HEAD", "PATCH", "DELETE"])
@pytest.mark.parametrize("version", [None, "0.2.2", "2.0.0"])
def test_tus_resumable_is_required(served, method, version):
    url = served.new(10)
    target = "/files/" if method == "POST" else _path(url)
    headers = {"Upload-Length": "10", "Upload-Offset": "0", "Content-Type": OCTET}
    if version:
        headers["Tus-Resumable"] = version
    response = served.client.simulate_request(method, target, headers=headers, body=b"")
    assert response.status_code == 412
    assert response.headers["Tus-Version"] == "1.0.0"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Upload-Length": "10", "Upload-Defer-Length": "1"},
        {"Upload-Length": "-5"},
        {"Upload-Length": "ten"},
        {"Upload-Defer-Length": "2"},
        {"Upload-Length": "10", "Upload-Metadata": "key not-base64!"},
        {"Upload-Length": "10", "Upload-Metadata": "a Zm9v,a YmFy"},
        {"Upload-Length": "10", "Upload-Metadata": "too many parts here"},
        {"Upload-Length": "10", "Upload-Metadata": ",a Zm9v"},
        {"Upload-Length": "10", "Upload-Concat": "bogus"},
        {"Upload-Length": "10", "Upload-Concat": "final;"},
    ],
)
def test_bad_creation_requests(served, headers):
    assert_error(served.create(headers=headers), 400, "bad_header")
    assert not served.live  # nothing was created


def test_creation_beyond_max_size_is_413(make_served):
    served = make_served(max_upload_size=MiB)
    assert served.client.simulate_options("/files/").headers["Tus-Max-Size"] == str(MiB)
    assert_error(served.create(MiB + 1), 413, "upload_too_large")
    assert served.create(MiB).status_code == 201


def test_metadata_too_large_is_400(served):
    assert_error(served.create(10, {"Upload-Metadata": metadata(big="x" * 5000)}), 400)


def test_metadata_limit_is_configurable(make_served):
    served = make_served(max_metadata_size=64)
    assert_error(served.create(5, {"Upload-Metadata": metadata(filename="x" * 100)}), 400)
    assert served.create(5, {"Upload-Metadata": metadata(filename="short")}).status_code == 201


@pytest.mark.parametrize(
    "headers,data,status",
    [
        ({"Content-Type": "text/plain"}, b"abc", 415),  # not an offset stream
        ({}, b"x" * 11, 413),  # longer than Upload-Length
        ({"Upload-Checksum": "crc99 AAAA"}, b"abc", 400),
        ({"Upload-Concat": "final;/files/AAAAAAAAAAAAAAAAAAAAAA"}, b"abc", 400),
    ],
)
def test_refused_creation_body_creates_nothing(served, headers, data, status):
    length = None if "Upload-Concat" in headers else 10
    h = {**TUS, **({"Upload-Length": "10"} if length else {}), "Content-Type": OCTET, **headers}
    refused = served.client.simulate_post("/files/", headers=h, body=data)
    assert_error(refused, status)
    assert "Location" not in refused.headers
    assert not served.live


def test_creation_with_upload_and_empty_upload(served):
    created = served.create(10, body=b"abcd")
    assert created.status_code == 201 and created.headers["Upload-Offset"] == "4"
    empty = served.create(0)
    assert empty.status_code == 201
    assert served.session(_id(empty.headers["Location"])).state == states.COMPLETED


def test_concatenation_refusals(served):
    unfinished = served.new(10, {"Upload-Concat": "partial"})
    normal = served.upload(b"abc")
    cases = [
        f"final;{_path(unfinished)}",
        f"final;{_path(normal)}",
        "final;/files/AAAAAAAAAAAAAAAAAAAAAA",
        "final;http://elsewhere.example/other/xyz",
    ]
    for value in cases:
        assert_error(served.create(headers={"Upload-Concat": value}), 400)
    assert_error(served.create(5, {"Upload-Concat": f"final;{_path(unfinished)}"}), 400)


def test_session_limits(make_served):
    served = make_served(max_sessions_per_owner=2, max_sessions=3)
    urls = [served.new(10), served.new(10)]
    assert_error(served.create(10), 429, "too_many_sessions")
    assert served.patch(urls[0], 0, b"x" * 10).status_code == 204  # finished: no longer counted
    assert served.create(10).status_code == 201


def test_total_session_limit(make_served):
    served = make_served(
        auth=True, api_keys=f"alice={hash_key(ALICE)},bob={hash_key(BOB)}", max_sessions=2
    )
    served.new(10, bearer(ALICE))
    served.new(10, bearer(BOB))
    assert_error(served.create(10, bearer(ALICE)), 429, "server_busy")


def test_unreachable_pre_create_receiver_refuses_with_503(make_served):
    served = make_served(hook_url=f"http://127.0.0.1:{free_port()}/", hook_timeout=1)
    assert_error(served.create(10), 503, "hook_unavailable")
    assert not served.live


# -- tus: one upload --------------------------------------------------------------------------


def test_head_reports_offset_length_metadata(served):
    meta = metadata(filename="a b.txt", filetype="text/plain", empty="")
    created = served.create(100, {"Upload-Metadata": meta + ",flag"})
    assert created.status_code == 201 and created.headers["Upload-Offset"] == "0"
    url = created.headers["Location"]
    assert served.patch(url, 0, b"x" * 40).status_code == 204
    head = served.head(url)
    assert head.status_code == 200
    assert head.headers["Upload-Offset"] == "40"
    assert head.headers["Upload-Length"] == "100"
    assert head.headers["Cache-Control"] == "no-store"
    assert head.headers["Upload-Metadata"] == meta + ",flag"
    assert head.headers["Tus-Resumable"] == "1.0.0"
    assert "GMT" in head.headers["Upload-Expires"]
    assert head.content == b""
    deferred = served.new(None, {"Upload-Defer-Length": "1"})
    assert served.head(deferred).headers["Upload-Defer-Length"] == "1"


def test_patch_rules(served):
    url = served.new(10)
    bad_type = served.patch(url, 0, b"a", headers={"Content-Type": "text/plain"})
    assert_error(bad_type, 415, "bad_content_type")
    no_offset = served.client.simulate_patch(
        _path(url), headers={**TUS, "Content-Type": OCTET}, body=b"a"
    )
    assert_error(no_offset, 400, "bad_header")
    for garbage in ["-1", "abc", "1.5", "99999999999999999999999", ""]:
        assert_error(served.patch(url, garbage, b"a"), 400)
    assert_error(served.patch(url, 3, b"a"), 409, "offset_mismatch")
    assert served.patch(url, 0, b"abcd").status_code == 204
    conflict = assert_error(served.patch(url, 0, b"abcd"), 409, "offset_mismatch")
    assert conflict["offset"] == 4
    assert_error(served.patch(url, 4, b"x" * 7), 413, "exceeds_length")
    assert served.head(url).headers["Upload-Offset"] == "4"
    done = served.patch(url, 4, b"efghij")
    assert done.status_code == 204 and done.headers["Upload-Offset"] == "10"
    assert_error(served.patch(url, 10, b"k"), 409, "completed")
    repeat = served.patch(url, 10, b"")  # a client re-sending its last PATCH after losing the 204
    assert repeat.status_code == 204 and repeat.headers["Upload-Offset"] == "10"
    assert_error(served.patch(url, 4, b""), 409)


def test_patch_of_a_paused_terminated_or_seed_upload(served):
    url = served.new(10)
    served.set_state(_id(url), states.PAUSED)
    paused = served.patch(url, 0, b"abc")
    assert_error(paused, 423, "paused")
    assert paused.headers["Upload-Offset"] == "0"
    served.set_state(_id(url), states.TERMINATED)
    assert_error(served.patch(url, 0, b"abc"), 410, "terminated")
    assert_error(served.head(url), 410)
    seed = served.seed_session()
    assert_error(served.patch(f"/files/{seed}", 0, b"abc"), 409, "seed_session")


def test_deferred_length_cannot_be_changed_or_too_small(served):
    url = served.new(None, {"Upload-Defer-Length": "1"})
    assert_error(served.patch(url, 0, b"abcdef", headers={"Upload-Length": "3"}), 400)
    assert served.patch(url, 0, b"abc", headers={"Upload-Length": "5"}).status_code == 204
    assert_error(served.patch(url, 3, b"d", headers={"Upload-Length": "9"}), 400, "length_set")


@pytest.mark.parametrize("value", ["crc99 AAAA", "sha1 !!!notbase64", "sha1", "sha256 "])
def test_bad_checksum_header_is_400(served, value):
    url = served.new(3)
    assert_error(served.patch(url, 0, b"abc", headers={"Upload-Checksum": value}), 400)
    assert served.head(url).headers["Upload-Offset"] == "0"


def test_unknown_upload_is_404(served):
    missing = "/files/AAAAAAAAAAAAAAAAAAAAAA"
    assert_error(served.head(missing), 404)
    assert_error(served.patch(missing, 0, b"a"), 404, "unknown_session")
    assert_error(served.client.simulate_delete(missing, headers=TUS), 404, "unknown_session")
    assert_error(served.client.simulate_get(missing), 404, "unknown_session")
    assert_error(served.client.simulate_get("/files/../../etc/passwd"), 404)


def test_x_http_method_override(served):
    url = served.new(3)
    overridden = served.client.simulate_post(
        _path(url),
        headers={
            **TUS,
            "X-HTTP-Method-Override": "PATCH",
            "Upload-Offset": "0",
            "Content-Type": OCTET,
        },
        body=b"abc",
    )
    assert overridden.status_code == 204 and overridden.headers["Upload-Offset"] == "3"
    gone = served.client.simulate_post(
        _path(url), headers={**TUS, "X-HTTP-Method-Override": "DELETE"}
    )
    assert gone.status_code == 204
    assert_error(served.head(url), 410)


def test_x_http_method_override_on_every_method(served):
    """tus 1.0: the override MUST be honoured when present, whatever the request's method."""
    options = served.client.simulate_get("/files/", headers={"X-HTTP-Method-Override": "OPTIONS"})
    assert options.status_code == 204 and options.headers["Tus-Version"] == "1.0.0"
    url = served.new(3)
    head = served.client.simulate_get(_path(url), headers={**TUS, "X-HTTP-Method-Override": "HEAD"})
    assert head.status_code == 200 and head.headers["Upload-Offset"] == "0"
    patched = served.client.simulate_put(
        _path(url),
        headers={
            **TUS,
            "X-HTTP-Method-Override": "PATCH",
            "Upload-Offset": "0",
            "Content-Type": OCTET,
        },
        body=b"abc",
    )
    assert patched.status_code == 204 and patched.headers["Upload-Offset"] == "3"


def test_expiration_header(served):
    created = served.create(10)
    assert "GMT" in created.headers["Upload-Expires"]
    patched = served.patch(created.headers["Location"], 0, b"12345")
    assert "GMT" in patched.headers["Upload-Expires"]


# -- browsers ---------------------------------------------------------------------------------


def test_cors_preflight_and_exposed_headers(served):
    preflight = served.client.simulate_options(
        "/files/",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "tus-resumable, upload-length, x-app-trace",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] in ("*", "https://app.example")
    assert "PATCH" in preflight.headers["Access-Control-Allow-Methods"]
    allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "upload-offset" in allowed and "tus-resumable" in allowed
    assert "x-app-trace" in allowed  # a client's own headers (tus-js-client `headers:`)
    assert preflight.headers["Tus-Version"] == "1.0.0"  # still a tus OPTIONS
    assert "creation" in preflight.headers["Tus-Extension"]
    created = served.create(5, headers={"Origin": "https://app.example"})
    exposed = created.headers["Access-Control-Expose-Headers"].lower()
    for name in [
        "location",
        "upload-offset",
        "upload-length",
        "upload-expires",
        "tus-resumable",
        "upload-metadata",
        "tus-version",
    ]:
        assert name in exposed


def test_cors_origins_can_be_restricted(make_served):
    served = make_served(cors_origins="https://good.example")
    good = served.client.simulate_options(
        "/files/",
        headers={"Origin": "https://good.example", "Access-Control-Request-Method": "PATCH"},
    )
    assert good.headers["Access-Control-Allow-Origin"] == "https://good.example"
    evil = served.client.simulate_options(
        "/files/",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "PATCH"},
    )
    assert "Access-Control-Allow-Origin" not in evil.headers


# -- tus: downloads ---------------------------------------------------------------------------


def test_download_headers_and_ranges(served):
    data = bytes(range(256)) * 400
    meta = metadata(filename='we"ird ünïcode.png', filetype="image/png")
    url = served.upload(data, {"Upload-Metadata": meta})
    full = served.client.simulate_get(_path(url))
    assert full.status_code == 200 and full.content == data
    assert full.headers["Content-Length"] == str(len(data))
    assert full.headers["Content-Type"] == "image/png"
    disposition = full.headers["Content-Disposition"]
    assert disposition.startswith("attachment;") and "filename*=UTF-8''" in disposition
    assert full.headers["Accept-Ranges"] == "bytes"
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert full.headers["Repr-Digest"] == f"sha-256=:{digest}:"
    size = len(data)
    cases = {
        "bytes=0-9": data[:10],
        f"bytes={size - 10}-": data[-10:],
        "bytes=-5": data[-5:],
        "bytes=500-99999999": data[500:],
    }
    for header, expected in cases.items():
        part = served.client.simulate_get(_path(url), headers={"Range": header})
        assert part.status_code == 206, header
        assert part.content == expected
        assert part.headers["Content-Range"].endswith(f"/{size}")
    bad = served.client.simulate_get(_path(url), headers={"Range": f"bytes={size * 2}-"})
    assert_error(bad, 416, "range_not_satisfiable")
    assert bad.headers["Content-Range"] == f"bytes */{size}"
    ignored = served.client.simulate_get(_path(url), headers={"Range": "lines=1-2"})
    assert ignored.status_code == 200 and ignored.content == data
    etag = full.headers["ETag"]
    same = served.client.simulate_get(_path(url), headers={"Range": "bytes=0-9", "If-Range": etag})
    assert same.status_code == 206 and same.content == data[:10]
    changed = served.client.simulate_get(
        _path(url), headers={"Range": "bytes=0-9", "If-Range": '"other"'}
    )
    assert changed.status_code == 200 and changed.content == data
    wrong_version = served.client.simulate_get(_path(url), headers={"Tus-Resumable": "0.2.0"})
    assert wrong_version.status_code == 412
    assert served.client.simulate_get(_path(url), headers=TUS).status_code == 200


def test_download_of_an_incomplete_upload_is_refused(served):
    url = served.new(10)
    assert_error(served.client.simulate_get(_path(url)), 409, "not_complete")


def test_hostile_filetype_is_not_served(served):
    meta = metadata(filename="x.html", filetype="text/html\r\nX: y")
    url = served.upload(b"<script>", {"Upload-Metadata": meta})
    response = served.client.simulate_get(_path(url))
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


# -- credentials ------------------------------------------------------------------------------


@pytest.fixture
def secure(make_served) -> Served:
    return make_served(auth=True, api_keys=f"alice={hash_key(ALICE)},bob={hash_key(BOB)}")


def _every_endpoint(served: Served, session_id: str, tus_url: str):
    client, params, upload = served.client, {"sessionID": session_id}, _path(tus_url)
    yield "status", lambda h: client.simulate_get("/upload/status", params=params, headers=h)
    yield "pause", lambda h: client.simulate_get("/upload/pause", params=params, headers=h)
    yield "resume", lambda h: client.simulate_post("/upload/resume", params=params, headers=h)
    yield (
        "terminate",
        lambda h: client.simulate_post("/upload/terminate", params=params, headers=h),
    )
    yield "delete", lambda h: client.simulate_delete("/upload", params=params, headers=h)
    yield "head", lambda h: client.simulate_head(upload, headers={**TUS, **h})
    yield (
        "patch",
        lambda h: client.simulate_patch(
            upload, headers={**TUS, **h, "Upload-Offset": "0", "Content-Type": OCTET}, body=b"x"
        ),
    )
    yield "tus-delete", lambda h: client.simulate_delete(upload, headers={**TUS, **h})
    yield "get", lambda h: client.simulate_get(upload, headers=h)


def test_every_endpoint_needs_a_credential(secure):
    session_id = secure.seed_session(bearer(ALICE))
    tus_url = secure.new(10, bearer(ALICE))
    for name, call in _every_endpoint(secure, session_id, tus_url):
        response = call({})
        assert response.status_code == 401, name
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="upload_server"'  # RFC 6750
        if name != "head":
            assert response.json["error"]["code"] == "unauthorized"
    assert_error(secure.post_file(), 401)
    assert_error(secure.create(1), 401)
    wrong = secure.client.simulate_get(
        "/upload/status", params={"sessionID": "x" * 22}, headers=bearer("not-a-key")
    )
    assert_error(wrong, 401, "invalid_credential")
    assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    # a credential in the query counts for downloads only, not for the session API
    in_query = secure.client.simulate_get(
        "/upload/status", params={"sessionID": session_id, "access_token": ALICE}
    )
    assert in_query.status_code == 401
    basic = secure.client.simulate_get("/upload/status", headers={"Authorization": "Basic YTpi"})
    assert basic.status_code == 401
    # public: health, and CORS preflights
    assert secure.client.simulate_get("/healthz").status_code == 200
    preflight = secure.client.simulate_options(
        "/files/",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 204


def test_sessions_are_invisible_to_other_credentials(secure):
    session_id = secure.seed_session(bearer(ALICE))
    tus_url = secure.upload(b"hello", bearer(ALICE))
    for name, call in _every_endpoint(secure, session_id, tus_url):
        assert call(bearer(BOB)).status_code == 404, name
    mine = secure.client.simulate_get(
        "/upload/status", params={"sessionID": session_id}, headers=bearer(ALICE)
    )
    assert mine.status_code == 200
    assert secure.client.simulate_get(_path(tus_url), headers=bearer(ALICE)).content == b"hello"
    # a partial upload of alice cannot be concatenated by bob
    part = secure.new(3, {"Upload-Concat": "partial", **bearer(ALICE)})
    assert secure.patch(part, 0, b"abc", bearer(ALICE)).status_code == 204
    stolen = secure.create(headers={"Upload-Concat": f"final;{_path(part)}", **bearer(BOB)})
    assert_error(stolen, 400, "unknown_part")


# -- the seed API -----------------------------------------------------------------------------


def test_seed_creation_answers_201_and_hands_the_session_to_its_writer(served):
    created = served.post_file(b"x" * 100)
    assert created.status_code == 201
    session_id = created.json["sessionID"]
    assert created.json["sessionIDs"] == [session_id]
    assert created.json["files"] == [
        {"sessionID": session_id, "filename": "a.bin", "totalBytes": 100}
    ]
    assert served.writers.drained == [session_id]
    assert served.layout.spool(session_id).stat().st_size == 100
    status = served.client.simulate_get("/upload/status", params={"sessionID": session_id})
    assert status.status_code == 200 and status.json["sessionID"] == session_id


@pytest.mark.parametrize(
    "path,method",
    [
        ("/upload/status", "GET"),
        ("/upload/pause", "GET"),
        ("/upload/resume", "POST"),
        ("/upload/terminate", "POST"),
        ("/upload", "DELETE"),
    ],
)
def test_missing_and_unknown_session_ids(served, path, method):
    call = served.client.simulate_request
    assert_error(call(method, path), 400, "missing_session_id")
    assert_error(call(method, path, params={"sessionID": "x" * 22}), 404, "unknown_session")
    assert_error(call(method, path, params={"sessionID": "../../etc"}), 404, "unknown_session")


def test_missing_file_field(served):
    body, content_type = _multipart(("other", ("a", b"data")))
    response = served.client.simulate_post(
        "/upload", body=body, headers={"Content-Type": content_type}
    )
    assert_error(response, 400, "missing_file")


def test_body_that_is_not_multipart(served):
    raw = served.client.simulate_post(
        "/upload", body=b"raw bytes", headers={"Content-Type": "application/octet-stream"}
    )
    assert_error(raw, 415, "not_multipart")
    assert_error(served.client.simulate_post("/upload"), 415, "not_multipart")


@pytest.mark.parametrize(
    "body",
    [
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
        b"no boundary here at all",
        b'--b\r\nContent-Disposition: form-data; name="file"',
        b"--b\r\nX: y\r\n\r\nabc\r\n--b--",
    ],
)
def test_malformed_multipart(served, body):
    response = served.client.simulate_post(
        "/upload", body=body, headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert_error(response, 400, "bad_multipart")


def test_multipart_without_boundary(served):
    response = served.client.simulate_post(
        "/upload", body=b"x", headers={"Content-Type": "multipart/form-data"}
    )
    assert_error(response, 400, "bad_multipart")


@pytest.mark.parametrize(
    "digests", [[b"abc"], [b"0" * 63], [b"g" * 64], [b"a" * 201], [b"a" * 64, b"b" * 64]]
)
def test_bad_sha256_field(served, digests):
    body, content_type = _multipart(
        *[("sha256", digest) for digest in digests], ("file", ("a.bin", b"hello"))
    )
    response = served.client.simulate_post(
        "/upload", body=body, headers={"Content-Type": content_type}
    )
    assert_error(response, 400, "bad_digest")
    assert not served.live


def test_too_large(make_served):
    served = make_served(max_upload_size=MiB)
    assert_error(served.post_file(b"x" * (MiB + 1)), 413, "upload_too_large")
    assert not served.live
    assert served.post_file(b"x" * MiB).status_code == 201


def test_batch_status(served):
    first, second = served.seed_session(), served.seed_session()
    unknown = "A" * 22
    batch = served.client.simulate_get(
        "/upload/status", params={"sessionIDs": f"{first},{second},{unknown}"}
    )
    assert batch.status_code == 200
    assert [s["sessionID"] for s in batch.json["sessions"]] == [first, second]
    assert batch.json["notFound"] == [unknown]
    repeated = served.client.simulate_get(
        "/upload/status", query_string=f"sessionID={first}&sessionID={unknown}"
    )
    assert [s["sessionID"] for s in repeated.json["sessions"]] == [first]
    too_many = ",".join([unknown] * 1001)
    assert_error(
        served.client.simulate_get("/upload/status", params={"sessionIDs": too_many}),
        400,
        "batch_too_large",
    )


@pytest.mark.parametrize("state", [states.COMPLETED, states.TERMINATED])
def test_pause_resume_terminate_refused_once_ended(served, state):
    session_id = served.seed_session()
    served.set_state(session_id, state)
    params = {"sessionID": session_id}
    assert_error(served.client.simulate_get("/upload/pause", params=params), 409, state)
    assert_error(served.client.simulate_post("/upload/resume", params=params), 409, state)
    terminate = served.client.simulate_post("/upload/terminate", params=params)
    if state == states.COMPLETED:
        assert_error(terminate, 409, "completed")
    else:  # terminating again answers the terminated session
        assert terminate.status_code == 200 and terminate.json["state"] == state


def test_resume_of_a_running_upload_is_refused(served):
    session_id = served.seed_session()
    served.set_state(session_id, states.WRITING)
    resumed = served.client.simulate_post("/upload/resume", params={"sessionID": session_id})
    assert_error(resumed, 409, "not_paused")


def test_expired_session_is_gone(served):
    session_id = served.seed_session()
    served.set_state(session_id, states.EXPIRED)
    status = served.client.simulate_get("/upload/status", params={"sessionID": session_id})
    assert_error(status, 404, "session_expired")


def test_pause_and_resume_go_to_the_writer(served):
    session_id = served.seed_session()
    params = {"sessionID": session_id}
    paused = served.client.simulate_get("/upload/pause", params=params)
    assert paused.status_code == 200 and paused.json["state"] == states.PAUSED
    resumed = served.client.simulate_post("/upload/resume", params=params)
    assert resumed.status_code == 200 and resumed.json["state"] == states.QUEUED


# -- every answer ---------------------------------------------------------------------------


def test_unknown_route_and_method_are_json(served):
    assert_error(served.client.simulate_get("/nope"), 404)
    assert_error(served.client.simulate_put("/upload/status"), 405)


def test_errors_are_never_tracebacks(served):
    response = served.client.simulate_post(
        "/upload",
        body=b"\xff" * 100,
        headers={"Content-Type": "multipart/form-data; boundary=\xff"},
    )
    assert response.status_code in (400, 415)
    json.loads(response.text)


def test_health_without_processes(served):
    assert served.client.simulate_get("/healthz").json == {"status": "ok"}
    ready = served.client.simulate_get("/readyz")
    assert ready.status_code == 200 and ready.json["writers"] == 0


# -- metrics ----------------------------------------------------------------------------------


def _counted(name: str) -> Callable[..., Any]:
    def walk(self: WalkCounting, *args: Any) -> Any:
        self.walks += 1
        return getattr(dict, name)(self, *args)

    return walk


class WalkCounting(dict):
    """A live view that counts the calls that walk every session."""

    walks = 0
    copy = _counted("copy")
    items = _counted("items")
    values = _counted("values")
    keys = _counted("keys")
    __iter__ = _counted("__iter__")


def _active_sessions() -> float:
    """This process's active-sessions gauge (a scrape here may read another directory's files:
    a test in this process that started a runtime chose one)."""
    (sample,) = metrics.get().active_sessions.collect()[0].samples
    return sample.value


def test_a_scrape_never_walks_the_sessions(served):
    for _ in range(3):
        served.new(10)
    watched = WalkCounting(served.live)
    served.service.live.replace(watched)
    assert served.client.simulate_get("/metrics").status_code == 200
    assert watched.walks == 0
    assert _active_sessions() == 3


def test_the_active_sessions_gauge_follows_each_session(served):
    """Kept as sessions change: created (in), completed, terminated, failed (out), resumed (in)."""
    done, ended, failing = served.new(3), served.new(3), served.new(3)
    assert _active_sessions() == 3
    assert served.patch(done, 0, b"abc").status_code == 204
    assert _active_sessions() == 2
    gone = served.client.simulate_delete(_path(ended), headers=TUS)
    assert gone.status_code == 204
    assert _active_sessions() == 1
    served.writers.fail(_id(failing))
    assert _active_sessions() == 0
    resumed = served.client.simulate_post("/upload/resume", params={"sessionID": _id(failing)})
    assert resumed.status_code == 200, resumed.text
    assert _active_sessions() == 1
    assert len(served.service.in_progress) == 1


@pytest.fixture
def metrics_secured(make_served) -> Served:
    """/metrics behind the API keys, with auth off for the upload APIs; tokens are signed too."""
    return make_served(metrics_auth=True, api_keys=f"alice={hash_key(ALICE)}", token_secret="s")


def test_metrics_auth_takes_an_api_key_only(metrics_secured):
    client = metrics_secured.client
    missing = client.simulate_get("/metrics")
    assert_error(missing, 401, "unauthorized")
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="upload_server"'
    assert_error(client.simulate_get("/metrics", headers=bearer("not-a-key")), 401)
    token = issue_token("s", "alice", 60)
    assert_error(client.simulate_get("/metrics", headers=bearer(token)), 403, "api_key_required")
    scraped = client.simulate_get("/metrics", headers=bearer(ALICE))
    assert scraped.status_code == 200
    described = client.simulate_get("/openapi.json").json["paths"]["/metrics"]["get"]
    assert described["security"] == [{"bearer": []}] and {"401", "403"} <= set(
        described["responses"]
    )
    # nothing else changes: the upload APIs stay open (auth off), health stays public
    assert metrics_secured.create(1).status_code == 201
    assert client.simulate_get("/readyz").status_code == 200


def test_metrics_auth_needs_api_keys(make_served):
    with pytest.raises(ValueError, match="--metrics-auth needs API keys"):
        make_served(metrics_auth=True, token_secret="s")


def test_metrics_listen_takes_metrics_off_the_app(make_served):
    served = make_served(metrics_listen="127.0.0.1:9")
    assert_error(served.client.simulate_get("/metrics"), 404)
    assert "/metrics" not in served.client.simulate_get("/openapi.json").json["paths"]
    assert served.client.simulate_get("/healthz").status_code == 200


# -- the server around it ---------------------------------------------------------------------


def test_upload_servers_own_server_carries_the_adjustments_and_waitress_is_left_alone(served):
    """(`create_app`, which other tests call in-process, installs them on waitress's server class
    and its error answers: those are left out here.)"""
    originals = (
        waitress.channel.HTTPChannel.parser_class,
        waitress.channel.HTTPChannel.task_class,
        waitress.channel.HTTPChannel.error_task_class,
        waitress.buffers.TempfileBasedBuffer.newfile,
        waitress.wasyncore.dispatcher.del_channel,
    )
    policy = waitress_patches.ServerPolicy(spool_dir=served.layout.spool_dir)
    app = build_app(served.config, served.service, NoProcesses(served.config, served.layout))
    server = waitress_server.create_server(app, policy, host="127.0.0.1", port=0)
    try:
        assert isinstance(server, waitress_server.UploadServer)
        assert issubclass(server.channel_class, waitress_patches.KeepingChannel)
        assert server.channel_class.policy is policy
        assert server.channel_class.task_class is waitress_patches.KeepAliveTask
        assert server.asyncore is waitress_server.LOOP
    finally:
        server.close()
    assert originals == (
        waitress.channel.HTTPChannel.parser_class,
        waitress.channel.HTTPChannel.task_class,
        waitress.channel.HTTPChannel.error_task_class,
        waitress.buffers.TempfileBasedBuffer.newfile,
        waitress.wasyncore.dispatcher.del_channel,
    )
