"""`upload-server import-tusd`: a directory in tusd's filestore layout (written here from tusd's
documented `.info` format) is served by our server with offsets, lengths and metadata intact."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from upload_server.import_tusd import our_id

from .tus_http import Tus

pytestmark = pytest.mark.frontend


def write_upload(
    directory: Path,
    upload_id: str,
    data: bytes,
    size: int | None,
    metadata: dict[str, str],
    *,
    recorded_offset: int = 0,
    storage_path: str | None = None,
    **flags: object,
) -> None:
    """An upload as tusd's filestore leaves it: `<id>` (data) and `<id>.info` (FileInfo JSON)."""
    data_path = directory / (storage_path or upload_id)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    data_path.write_bytes(data)
    info = {
        "ID": upload_id,
        "Size": size or 0,
        "SizeIsDeferred": size is None,
        "Offset": recorded_offset,  # tusd does not keep it current: the data file's size is
        "MetaData": metadata,
        "IsPartial": False,
        "IsFinal": False,
        "PartialUploads": None,
        "Storage": {
            "Type": "filestore",
            "Path": f"./tusd-data/{storage_path or upload_id}",  # relative to tusd's cwd
            "InfoPath": f"./tusd-data/{upload_id}.info",
        },
        **flags,
    }
    info_path = directory / f"{upload_id}.info"
    info_path.parent.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps(info))


def run_import(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "upload_server.cli", "import-tusd", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_tusd_directory_is_served_with_offsets_and_metadata(tmp_path, make_server):
    tusd = tmp_path / "tusd-data"
    tusd.mkdir()
    unfinished, finished = "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"
    write_upload(
        tusd, unfinished, b"hell", 11, {"filename": "greeting.txt", "filetype": "text/plain"}
    )
    write_upload(tusd, finished, b"done!", 5, {"filename": "done.txt"}, recorded_offset=5)
    write_upload(
        tusd, "project-7/abc", b"xyz", 9, {"filename": "p.pdf"}, storage_path="project-7/abc/p.pdf"
    )
    write_upload(tusd, "deferred00000000000000", b"123", None, {"name": "later.bin"})
    (tusd / "broken.info").write_text("{not json")
    uploads = tmp_path / "uploads"

    result = run_import(str(tusd), "--upload-dir", str(uploads))
    assert result.returncode == 1, result.stderr  # the broken one is reported
    assert "broken: unreadable .info" in result.stderr and "Traceback" not in result.stderr
    lines = {line.split("\t")[0]: line.split("\t") for line in result.stdout.splitlines()}
    assert lines[unfinished][1:3] == [unfinished, "waiting"]
    assert lines[finished][1:3] == [finished, "completed"]
    slashed = our_id("project-7/abc")
    assert lines["project-7/abc"][1] == slashed and slashed.startswith("tusd-")

    server = make_server(upload_dir=uploads)
    tus = Tus(server.base)
    url = f"{server.base}/files/{unfinished}"
    head = tus.head(url)
    assert head.status_code == 200, head.text
    assert head.headers["Upload-Offset"] == "4" and head.headers["Upload-Length"] == "11"
    meta = dict(pair.split(" ") for pair in head.headers["Upload-Metadata"].split(","))
    assert base64.b64decode(meta["filename"]) == b"greeting.txt"
    assert tus.patch(url, 4, b"o world").status_code == 204
    status = server.wait_state(unfinished, "completed")
    assert status["storedAs"] == "greeting.txt"
    assert status["sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert requests.get(url, timeout=10).headers["Content-Type"] == "text/plain"

    done = requests.get(f"{server.base}/files/{finished}", timeout=10)
    assert done.status_code == 200 and done.content == b"done!"
    assert server.status(finished)["sha256"] == hashlib.sha256(b"done!").hexdigest()
    assert tus.head(f"{server.base}/files/{slashed}").headers["Upload-Offset"] == "3"
    deferred = tus.head(f"{server.base}/files/deferred00000000000000")
    assert deferred.headers["Upload-Defer-Length"] == "1"
    assert deferred.headers["Upload-Offset"] == "3"

    # the tusd directory is left as it was (no --move); a server holds the lock
    assert (tusd / unfinished).read_bytes() == b"hell"
    locked = run_import(str(tusd), "--upload-dir", str(uploads))
    assert locked.returncode == 1 and "stop it first" in locked.stderr
    server.stop()
    again = run_import(str(tusd), "--upload-dir", str(uploads))
    assert again.stdout.count("already imported") == 4, again.stdout
