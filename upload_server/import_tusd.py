"""`upload-server import-tusd DIR`: serve the uploads of a tusd filestore directory from here.

tusd's filestore keeps each upload as two files: the data, `DIR/<id>` (or the `Storage.Path` its
`.info` names), and `DIR/<id>.info`, the upload's JSON FileInfo (`ID`, `Size`, `SizeIsDeferred`,
`Offset`, `MetaData`, `IsPartial`, `IsFinal`, `PartialUploads`, `Storage`). Each becomes a session
of ours, with the offset taken from the data file's size, as tusd's own filestore does (the `.info`
offset may be stale), and its metadata, length and concatenation kept:

- an unfinished upload is copied (or with `--move`, moved) into the partial data and waits for its
  client's next PATCH, which any tus client sends after a HEAD to the same URL;
- a finished one is published into the upload directory under its `filename` metadata, with its
  SHA-256, and is downloadable at `/files/<id>` (a finished partial upload stays in the partial
  data, where a final concatenation reads it, as ours do).

An id stays the same when it is one we could have made (16-64 letters, digits, `-`, `_`); others
(tusd allows `/`, which our URLs do not) become `tusd-<32 hex>`, derived from the id, and the mapping
is printed so that a proxy can redirect the old URLs. An upload whose id is already here is skipped,
so running the import again is harmless. The server must be stopped (the upload directory's lock
is taken), and tusd too: its directory is read, never written (but with `--move`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .filenames import sanitize
from .hooks import is_hook_id
from .hooks_tusd import metadata_header
from .layout import Layout
from .runtime import _try_lock
from .sessions import lifecycle
from .sessions import record as states
from .sessions.record import Session
from .sessions.store import FileSessionStore
from .storage.local import LocalStorage


@dataclass
class TusdUpload:
    """One upload of a tusd filestore directory, as its `.info` and data file describe it."""

    tusd_id: str
    info: dict[str, Any]
    data: Path

    @property
    def size(self) -> int | None:
        return None if self.info.get("SizeIsDeferred") else int(self.info.get("Size") or 0)

    @property
    def offset(self) -> int:
        return self.data.stat().st_size  # as tusd's filestore: the data file is the truth

    @property
    def metadata(self) -> dict[str, str]:
        found = self.info.get("MetaData") or {}
        return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def our_id(tusd_id: str) -> str:
    """The id here: the same when it can be ours, else one derived from it (the same each run)."""
    if is_hook_id(tusd_id):
        return tusd_id
    return "tusd-" + hashlib.sha256(tusd_id.encode()).hexdigest()[:32]


def read_directory(directory: Path) -> tuple[list[TusdUpload], list[str]]:
    """Every upload of a tusd filestore directory (ids may contain `/`: `.info` files are looked
    for in subdirectories too), and what could not be read."""
    uploads, problems = [], []
    for info_path in sorted(directory.rglob("*.info")):
        tusd_id = info_path.relative_to(directory).as_posix().removesuffix(".info")
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            problems.append(f"{tusd_id}: unreadable .info ({exc})")
            continue
        storage = info.get("Storage")
        stored = storage.get("Path") if isinstance(storage, dict) else None
        data = _data_path(directory, tusd_id, stored if isinstance(stored, str) else None)
        if data is None:
            problems.append(f"{tusd_id}: its data file is missing")
            continue
        uploads.append(TusdUpload(tusd_id, info, data))
    return uploads, problems


def _data_path(directory: Path, tusd_id: str, stored: str | None) -> Path | None:
    """Where the data is. tusd writes `Storage.Path` as it joined it at the time: absolute, or
    relative to tusd's working directory (`./data/<id>`), and the directory may have moved since;
    so that path as it is, then its shorter and shorter tails under DIR, then tusd's default."""
    candidates = []
    if stored:
        path = Path(stored)
        if path.is_absolute():
            candidates.append(path)
        parts = [p for p in path.parts if p not in (path.anchor, "", ".", "..")]
        candidates += [directory.joinpath(*parts[i:]) for i in range(len(parts))]
    candidates.append(directory / tusd_id)
    return next((c for c in candidates if c.is_file()), None)


def import_upload(
    upload: TusdUpload, layout: Layout, store: FileSessionStore, config: Config, *, move: bool
) -> tuple[str, Session | None, str]:
    """(our id, the new session or None, what happened) for one tusd upload."""
    session_id = our_id(upload.tusd_id)
    if store.load(session_id) is not None:
        return session_id, None, "already imported"
    size, offset = upload.size, upload.offset
    if size is not None and offset > size:
        return session_id, None, f"skipped: {offset} bytes of data for a length of {size}"
    final = bool(upload.info.get("IsFinal"))
    if final and offset != size:
        return session_id, None, "skipped: an unfinished final upload (concatenation-unfinished)"
    metadata = upload.metadata
    session = Session(
        id=session_id,
        protocol=states.TUS,
        filename=sanitize(metadata.get("filename") or metadata.get("name"), fallback=session_id),
        chunk_size=config.chunk_size,
        writer=int(hashlib.sha256(session_id.encode()).hexdigest(), 16) % config.writers,
        total_bytes=size,
        bytes_written=offset,
        state=states.WAITING,
        filetype=metadata.get("filetype") or metadata.get("type") or None,
        metadata=dict(metadata),
        metadata_header=metadata_header(metadata),
        concat="final" if final else "partial" if upload.info.get("IsPartial") else None,
        parts=[our_id(p) for p in upload.info.get("PartialUploads") or []],
    )
    _bring(upload.data, layout.partial(session_id), move=move)
    if size is not None and offset == size:
        location = None  # a partial upload stays where a final concatenation reads it
        if session.concat != "partial":
            storage = LocalStorage(layout)
            location = storage.publish(
                session_id, session.filename, durable=True, note=lambda _: None
            )
        lifecycle.complete(session, location)
        session.sha256 = _sha256(layout.root / location if location else layout.partial(session_id))
    elif config.expiry:
        session.expires_at = time.time() + config.expiry
    store.save(session, durable=True)
    return session_id, session, session.state


def _bring(source: Path, target: Path, *, move: bool) -> None:
    """Copy (or move) tusd's data file to where our partial data lives."""
    if move:
        with contextlib.suppress(OSError):
            os.replace(source, target)
            return
    shutil.copyfile(source, target)
    if move:
        source.unlink()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="upload-server import-tusd", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("directory", type=Path, help="tusd's -upload-dir (filestore)")
    parser.add_argument("--upload-dir", type=Path, help="ours (default: UPLOAD_SERVER_UPLOAD_DIR)")
    parser.add_argument("--move", action="store_true", help="move the data instead of copying")
    args = parser.parse_args(argv)
    try:
        overrides = {"upload_dir": str(args.upload_dir)} if args.upload_dir else {}
        config = Config.load(**overrides)
    except ValueError as exc:
        print(f"upload-server import-tusd: {exc}", file=sys.stderr)
        return 2
    if config.storage != "local" or config.shared:
        print(
            "upload-server import-tusd: only into local storage with file records", file=sys.stderr
        )
        return 2
    if not args.directory.is_dir():
        print(f"upload-server import-tusd: {args.directory} is not a directory", file=sys.stderr)
        return 2
    layout = Layout(config.upload_dir.absolute())
    layout.create()
    lock = os.open(layout.internal / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not _try_lock(lock):
            print(
                f"upload-server import-tusd: a server is using {layout.root}; stop it first",
                file=sys.stderr,
            )
            return 1
        uploads, problems = read_directory(args.directory)
        store = FileSessionStore(layout.sessions)
        for upload in uploads:
            try:
                session_id, _, outcome = import_upload(
                    upload, layout, store, config, move=args.move
                )
            except (OSError, ValueError, TypeError) as exc:
                problems.append(f"{upload.tusd_id}: {exc}")
                continue
            print(f"{upload.tusd_id}\t{session_id}\t{outcome}\t{upload.offset}/{upload.size}")
    finally:
        os.close(lock)
    for problem in problems:
        print(f"upload-server import-tusd: {problem}", file=sys.stderr)
    print(f"{len(uploads)} uploads read, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0
