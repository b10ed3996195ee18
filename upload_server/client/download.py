"""Downloading a completed upload, continuing a partial file with a Range request.

Like `curl -C -` or `wget -c`: an existing file shorter than the upload is taken as the start of
it, and only the rest is fetched. The result is then checked against the SHA-256 the server
reports (`Repr-Digest`), so a partial file that was not in fact the start of this upload is caught.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import requests
from tqdm import tqdm

from ..filenames import sanitize
from ..protocol import tus
from .api import Server, ServerError, Unreachable

BLOCK = 1024 * 1024
_DIGEST = re.compile(r"sha-256=:([A-Za-z0-9+/=]+):")


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    resumed_at: int  # 0 for a whole download
    verified: bool  # the server reported a SHA-256 and the file matches it


def download(server: Server, upload_id: str, output: Path | None) -> Downloaded:
    http = requests.Session()
    head = server.head(http, upload_id)
    length = int(head.headers["Upload-Length"])
    offset = int(head.headers["Upload-Offset"])
    if offset < length:
        raise ServerError(
            409, "not_complete", f"the upload has {offset} of {length} bytes; it is not complete"
        )
    target = _target(output, upload_id, head.headers.get("Upload-Metadata"))
    have = target.stat().st_size if target.exists() else 0
    if have > length:
        have = 0  # not a partial copy of this upload
    start = have
    if have < length or not target.exists():
        start = _fetch(server, http, upload_id, target, have, length)
    size = target.stat().st_size
    if size != length:
        raise ServerError(502, "short_download", f"got {size} of {length} bytes; run it again")
    expected = _expected_sha256(head.headers.get("Repr-Digest"))
    if expected and _sha256(target) != expected:
        raise ServerError(
            409,
            "digest_mismatch",
            f"{target} does not match the upload's sha256 {expected}; remove it and download again",
        )
    return Downloaded(target, size, start, bool(expected))


def _target(output: Path | None, upload_id: str, metadata_header: str | None) -> Path:
    try:
        metadata = tus.parse_metadata(metadata_header, 1 << 20)
    except tus.TusHeaderError:
        metadata = {}
    name = sanitize(metadata.get("filename") or metadata.get("name"), fallback=upload_id)
    if output is None:
        return Path(name)
    return output / name if output.is_dir() else output


def _fetch(
    server: Server, http: requests.Session, upload_id: str, target: Path, have: int, length: int
) -> int:
    """GET the rest of the upload into `target`; returns the byte it started from."""
    headers = {"Range": f"bytes={have}-"} if have else {}
    response = server.request(
        http, "GET", server.upload_url(upload_id), headers=headers, stream=True
    )
    with response:
        if response.status_code == 206:
            mode = "ab"
        elif response.status_code == 200:
            have, mode = 0, "wb"
        else:
            raise ServerError.from_response(response)
        bar = tqdm(
            total=length,
            initial=have,
            desc=target.name,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=None,
            leave=False,
        )
        try:
            with open(target, mode) as handle:
                for block in response.iter_content(BLOCK):
                    handle.write(block)
                    bar.update(len(block))
        except requests.RequestException as exc:
            raise Unreachable(
                f"the download was cut off ({type(exc).__name__}); run it again"
            ) from None
        finally:
            bar.close()
    return have


def _expected_sha256(header: str | None) -> str | None:
    match = _DIGEST.search(header or "")
    return base64.b64decode(match.group(1)).hex() if match else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()
