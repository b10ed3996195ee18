"""`upload-client` against real servers, run as a person runs it: in a pseudo-terminal (pexpect),
interrupted with Ctrl-C, run again to resume. Plain subprocesses where no terminal is needed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from threading import Event

import pexpect
import pytest
import requests

from upload_server.auth import hash_key
from upload_server.client.api import Server, resolve
from upload_server.client.state import StateError, StateFile
from upload_server.client.transfer import FileUploader, Job, Run

from .conftest import MiB, free_port, make_file, settled_offset, sha256_file, wait_for
from .netproxy import CuttingProxy

pytestmark = pytest.mark.frontend

_SCRIPT = Path(sys.executable).with_name("upload-client")
CLIENT = (
    [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "upload_server.client.command"]
)
SLOW = ["--max-bytes-per-second", "1MiB"]  # a 6 MiB upload takes about 6 s
OVERHEAD = 64 * 1024  # request lines and headers of a resumed upload, generously


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The client's environment: no settings inherited, HOME in the test's directory."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UPLOAD_CLIENT_")}
    return {**clean, "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}


def client(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 60):
    return subprocess.run(
        [*CLIENT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


class Terminal:
    """upload-client in a pseudo-terminal. Its output is read as it comes, so that the client
    never blocks on a full terminal while the test waits for something else."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.child = pexpect.spawn(
            CLIENT[0], [*CLIENT[1:], *args], env=env, dimensions=(30, 110), timeout=60
        )
        self.output: list[str] = []

    def pump(self) -> None:
        try:
            data = self.child.read_nonblocking(1 << 16, timeout=0.05)
            self.output.append(data.decode(errors="replace"))
        except (pexpect.TIMEOUT, pexpect.EOF):
            pass

    def wait_for(self, predicate, timeout: float = 30.0):
        def check():
            self.pump()
            return predicate()

        return wait_for(check, timeout=timeout, interval=0)

    def finish(self, timeout: float = 60.0) -> int:
        self.child.expect(pexpect.EOF, timeout=timeout)
        self.output.append(self.child.before.decode(errors="replace"))
        self.child.close()
        return self.child.exitstatus

    @property
    def text(self) -> str:
        return "".join(self.output)


def saved_entry(state: Path, source: Path) -> dict | None:
    """The state file's entry for `source`, once there is one."""
    try:
        uploads = json.loads(state.read_text())["uploads"]
    except (OSError, ValueError):
        return None
    return next((e for e in uploads.values() if e["path"] == str(source.resolve())), None)


def stored_file(server, url: str) -> Path:
    status = server.wait_state(url.rsplit("/", 1)[1], "completed", "failed")
    assert status["state"] == "completed", status
    return server.upload_dir / status["storedAs"]


# -- upload ------------------------------------------------------------------------------------


def test_ctrl_c_then_the_same_command_resumes_from_the_state_file(make_server, env, tmp_path):
    server = make_server(SLOW)
    proxy = CuttingProxy(server.port)
    try:
        source = make_file(tmp_path / "video.bin", 6 * MiB, seed=81)
        size = source.stat().st_size
        state = tmp_path / "state.json"
        command = ["upload", str(source), "--server", proxy.base, "--chunk-size", "1MiB"]
        command += ["--state-file", str(state)]

        first = Terminal(command, env)
        entry = first.wait_for(lambda: saved_entry(state, source))
        session_id = entry["url"].rsplit("/", 1)[1]
        first.wait_for(lambda: server.status(session_id)["bytesWritten"] >= 2 * MiB)
        first.child.sendintr()
        assert first.finish() == 130, first.text
        assert "run the same command again to resume" in first.text
        assert saved_entry(state, source)["url"] == entry["url"]
        committed = settled_offset(server, session_id)
        assert 0 < committed < size

        proxy.reset()
        second = Terminal(command, env)
        assert second.finish() == 0, second.text
        assert f"uploaded  {source}  {entry['url']}" in second.text
        assert sha256_file(stored_file(server, entry["url"])) == sha256_file(source)
        assert proxy.upstream_bytes <= size - committed + OVERHEAD
        assert saved_entry(state, source)["completed"] is True
    finally:
        proxy.close()


def test_several_files_and_a_folder_in_parallel(server, env, tmp_path):
    folder = tmp_path / "album"
    (folder / "2024").mkdir(parents=True)
    sources = [
        make_file(tmp_path / "one.bin", 3 * MiB + 1, seed=82),
        make_file(tmp_path / "two.bin", 1234, seed=83),
        make_file(folder / "cover.jpg", 500_000, seed=84),
        make_file(folder / "2024" / "trip.bin", 2 * MiB, seed=85),
        make_file(folder / "2024" / "empty.txt", 0),
    ]
    result = client(
        "upload", str(sources[0]), str(sources[1]), str(folder), "--parallel", "3",
        "--chunk-size", "1MiB", "--server", server.base, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 uploaded, 0 failed" in result.stdout
    urls = {}
    for line in result.stdout.splitlines():
        if line.startswith("uploaded  "):
            _, label, url, *_ = line.split()
            urls[label] = url
    assert len(urls) == 5
    for source in sources:
        assert sha256_file(stored_file(server, urls[str(source)])) == sha256_file(source)
    assert (tmp_path / ".upload-client-state.json").exists()  # the default, under HOME

    again = client("upload", str(folder), "--server", server.base, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already uploaded") == 3


def test_a_dropped_network_is_retried(server, env, tmp_path):
    proxy = CuttingProxy(server.port)
    try:
        source = make_file(tmp_path / "flaky.bin", 6 * MiB, seed=86)
        proxy.cut_at = 3 * MiB
        result = client(
            "upload", str(source), "--server", proxy.base, "--chunk-size", "1MiB", env=env
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert proxy.cut_at is None, "the network was never cut"
        url = result.stdout.split()[2]
        assert sha256_file(stored_file(server, url)) == sha256_file(source)
        assert proxy.upstream_bytes <= source.stat().st_size + MiB + OVERHEAD
    finally:
        proxy.close()


@contextlib.contextmanager
def sending(server, env: dict[str, str], source: Path, state: Path, *options: str):
    """`upload-client upload` of `source` in the background, once the server has 1 MiB of it:
    yields (the process, the upload URL); the process is killed on the way out."""
    command = [*CLIENT, "upload", str(source), "--server", server.base, "--chunk-size", "1MiB"]
    command += ["--state-file", str(state), *options]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = wait_for(lambda: saved_entry(state, source), timeout=30)["url"]
        session_id = url.rsplit("/", 1)[1]
        wait_for(lambda: server.status(session_id)["bytesWritten"] >= MiB, timeout=30)
        yield process, url
    finally:
        process.kill()


def test_a_server_that_stays_away_is_exit_3_and_stays_resumable(make_server, env, tmp_path):
    server = make_server(SLOW)
    source = make_file(tmp_path / "far.bin", 6 * MiB, seed=87)
    state = tmp_path / "state.json"
    with sending(server, env, source, state, "--retry-for", "2") as (process, url):
        server.stop()  # gone: connections refused from now on
        out, err = process.communicate(timeout=60)
    assert process.returncode == 3, out + err
    assert b"did not answer" in out
    assert saved_entry(state, source)["url"] == url


def test_a_file_that_changes_while_it_is_sent_fails_with_exit_1(make_server, env, tmp_path):
    server = make_server(SLOW)
    source = make_file(tmp_path / "moving.bin", 6 * MiB, seed=88)
    state = tmp_path / "state.json"
    with sending(server, env, source, state) as (process, url):
        with open(source, "r+b") as handle:  # change bytes the client has not sent yet
            handle.seek(5 * MiB)
            handle.write(b"changed!")
        out, err = process.communicate(timeout=90)
    assert process.returncode == 1, out + err
    assert server.status(url.rsplit("/", 1)[1])["error"]["code"] == "digest_mismatch"
    assert saved_entry(state, source) is None  # a rerun starts a new upload of the new content


def test_exit_codes_for_usage_errors_and_an_unreachable_server(env, tmp_path):
    present = make_file(tmp_path / "here.bin", 10)
    missing = client("upload", str(tmp_path / "nowhere.bin"), env=env)
    assert missing.returncode == 2
    assert "no such file or folder" in missing.stderr
    assert client("upload", str(present), "--chunk-size", "lots", env=env).returncode == 2
    assert client(env=env).returncode == 2
    (tmp_path / "broken.json").write_text("{not json")
    broken = client("upload", str(present), "--state-file", str(tmp_path / "broken.json"), env=env)
    assert broken.returncode == 2 and "state file" in broken.stderr

    nobody = f"http://127.0.0.1:{free_port()}"
    unreachable = client("upload", str(present), "--server", nobody, env=env)
    assert unreachable.returncode == 3
    assert "did not answer" in unreachable.stderr
    assert client("status", "abc", "--server", nobody, env=env).returncode == 3


# -- one session ------------------------------------------------------------------------------


def test_pause_and_resume_an_upload_that_another_client_is_sending(make_server, env, tmp_path):
    server = make_server(SLOW)
    source = make_file(tmp_path / "long.bin", 5 * MiB, seed=88)
    state = tmp_path / "state.json"
    with sending(server, env, source, state) as (sender, url):
        session_id = url.rsplit("/", 1)[1]
        paused = client("pause", url, env=env)
        assert paused.returncode == 0, paused.stderr
        assert "paused " + session_id in paused.stdout
        held = server.status(session_id)["bytesWritten"]
        time.sleep(2)
        status = client("status", session_id, "--server", server.base, "--json", env=env)
        assert json.loads(status.stdout)["state"] == "paused"
        assert json.loads(status.stdout)["bytesWritten"] == held < source.stat().st_size
        assert sender.poll() is None, "the sending client should wait while paused"

        resumed = client("resume", session_id, "--server", server.base, env=env)
        assert resumed.returncode == 0, resumed.stderr
        out, err = sender.communicate(timeout=60)
    assert sender.returncode == 0, out + err
    assert sha256_file(stored_file(server, url)) == sha256_file(source)
    shown = client("status", url, env=env)
    assert "state     completed" in shown.stdout
    assert f"sha256    {sha256_file(source)}" in shown.stdout


def test_cancel_and_errors_from_the_server(server, env):
    created = requests.post(
        server.url("/files/"),
        headers={"Tus-Resumable": "1.0.0", "Upload-Length": "1000"},
        timeout=10,
    )
    url = created.headers["Location"]
    cancelled = client("cancel", url, env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "state     terminated" in cancelled.stdout
    assert server.status(url.rsplit("/", 1)[1])["terminated"] is True

    unknown = client("status", "no-such-upload", "--server", server.base, env=env)
    assert unknown.returncode == 1 and "unknown_session" in unknown.stderr
    terminated = client("resume", url, env=env)
    assert terminated.returncode == 1 and "terminated" in terminated.stderr


def test_the_token_opens_a_server_with_auth(make_server, env, tmp_path):
    server = make_server(["--auth", "true", "--api-keys", f"alice={hash_key('s3cret-key')}"])
    source = make_file(tmp_path / "private.bin", 200_000, seed=90)
    refused = client("upload", str(source), "--server", server.base, env=env)
    assert refused.returncode == 1 and "credential" in refused.stdout

    with_token = {**env, "UPLOAD_CLIENT_TOKEN": "s3cret-key"}
    uploaded = client("upload", str(source), "--server", server.base, env=with_token)
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    url = uploaded.stdout.split()[2]
    status = client("status", url, "--token", "s3cret-key", env=env)
    assert "state     completed" in status.stdout
    assert client("status", url, env=env).returncode == 1
    fetched = client("download", url, "-o", str(tmp_path / "copy.bin"), env=with_token)
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()


# -- download ---------------------------------------------------------------------------------


def test_download_whole_and_continued(server, env, tmp_path):
    source = make_file(tmp_path / "report.pdf", 3 * MiB + 7, seed=89)
    upload = client("upload", str(source), "--server", server.base, env=env)
    url = upload.stdout.split()[2]
    stored_file(server, url)
    out = tmp_path / "out"
    out.mkdir()

    whole = client("download", url, env=env, cwd=out)  # named after the upload's filename
    assert whole.returncode == 0, whole.stderr
    assert (out / "report.pdf").read_bytes() == source.read_bytes()
    assert "sha256 verified" in whole.stdout

    partial = out / "partial.pdf"
    partial.write_bytes(source.read_bytes()[:MiB])
    continued = client("download", url.rsplit("/", 1)[1], "-o", str(partial), "--server",
                       server.base, env=env)  # fmt: skip
    assert continued.returncode == 0, continued.stderr
    assert "resumed at 1.0 MiB" in continued.stdout
    assert partial.read_bytes() == source.read_bytes()

    wrong = out / "wrong.pdf"
    wrong.write_bytes(b"x" * MiB)
    mismatch = client("download", url, "-o", str(wrong), env=env)
    assert mismatch.returncode == 1 and "does not match" in mismatch.stderr
    nowhere = client("download", url, "-o", str(out / "missing" / "f.pdf"), env=env)
    assert nowhere.returncode == 2 and "No such file or directory" in nowhere.stderr

    incomplete = requests.post(
        server.url("/files/"),
        headers={"Tus-Resumable": "1.0.0", "Upload-Length": "10"},
        timeout=10,
    ).headers["Location"]
    assert client("download", incomplete, "-o", str(out / "x"), env=env).returncode == 1


# -- pieces -----------------------------------------------------------------------------------


def test_resolve_ids_and_urls():
    server = Server("http://a:1", "/files/", "t")
    assert resolve("abc", server) == (server, "abc")
    other, upload_id = resolve("https://b:2/tus/xyz", server)
    assert (other.base, other.tus_path, other.token, upload_id) == (
        "https://b:2",
        "/tus/",
        "t",
        "xyz",
    )
    for bad in ("", "a/b", "ftp://b/files/x", "http:///files/x"):
        with pytest.raises(ValueError):
            resolve(bad, server)


def test_the_token_goes_on_every_tus_request(tmp_path):
    source = make_file(tmp_path / "f.bin", 10)
    run = Run(Server("http://a:1", "/files/", "s3cret"), MiB, StateFile(tmp_path / "s"), 1, Event())
    uploader = FileUploader(Job.of(source, "f.bin"), run, {"filename": "f.bin"}, lambda n: None)
    assert uploader.get_headers()["Authorization"] == "Bearer s3cret"
    assert uploader.get_url_creation_headers()["Authorization"] == "Bearer s3cret"
    metadata = uploader.get_url_creation_headers()["upload-metadata"]
    assert metadata == "filename " + base64.b64encode(b"f.bin").decode()


def test_state_file_survives_and_refuses_garbage(tmp_path):
    path = tmp_path / "state.json"
    state = StateFile(path)
    key = StateFile.key("http://a/files/", tmp_path / "f", 10, 123)
    state.put(key, {"url": "http://a/files/x"})
    assert StateFile(path).get(key) == {"url": "http://a/files/x"}
    assert not list(tmp_path.glob("*.tmp"))
    state.remove(key)
    assert StateFile(path).get(key) is None
    path.write_text('{"something": "else"}')
    with pytest.raises(StateError):
        StateFile(path)
