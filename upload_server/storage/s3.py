"""Upload data in S3 (AWS S3, MinIO, SeaweedFS...): one multipart upload per unfinished upload.

Layout, for an upload `<id>` under `s3://bucket/prefix`:

    prefix/<id>        the multipart upload while incomplete; the finished object once published
    prefix/<id>.part   the commit marker: the bytes past the last full part (any size, maybe none),
                       with metadata `base` (bytes in the committed parts) and `upload-id`

Writes go to a local buffer file (`.upload_server/partial/<id>`), never to memory. `commit` makes the
buffer durable in S3: each full `part_size` of it becomes the next part (`UploadPart` from the file),
and the rest is PUT as `<id>.part`, as tusd's s3store does. That PUT is the commit: a part uploaded
after the marker it would belong to was written (a crash in between) is past the marker's `base` and
is ignored, then overwritten. Any node can therefore `open` the upload from S3 alone: GET the marker
(base, upload id, tail bytes into the buffer) and ListParts for the sizes and ETags of the parts
below `base`. A rollback (`truncate`) only cuts into the buffer: parts are never sent in the middle
of an append, only when the writer commits a checked one.

An unfinished multipart upload cannot be read back, so this data is not `ReadBack`: a writer that
lost the running SHA-256 (the upload moved between nodes, or a writer restarted) hashes the finished
object once, streaming it from S3, after publishing it.

Part size: `s3_part_size` (at least 5 MiB, S3's minimum for every part but the last), raised so that
10,000 parts (S3's maximum) cover `max_upload_size`. Reaching the bucket (settings, client, errors,
streams) is `storage.s3_client`.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import fileio
from ..layout import Layout
from .base import CommittedData
from .s3_client import FileSlice, S3Reader, S3Settings, download, make_client, s3_errors


@dataclass
class _Part:
    number: int
    etag: str
    size: int


@dataclass
class _Committed:
    """What S3 holds for an unfinished upload, as the marker says."""

    upload_id: str | None = None
    parts: list[_Part] | None = None
    tail: int = 0
    marker: bool = False

    @property
    def base(self) -> int:
        return sum(p.size for p in self.parts or ())


class S3Storage:
    def __init__(self, settings: S3Settings, layout: Layout, client: Any | None = None) -> None:
        self.settings = settings
        self.layout = layout
        self.client = client if client is not None else make_client(settings)

    @property
    def bucket(self) -> str:
        return self.settings.bucket

    def key(self, session_id: str) -> str:
        return self.settings.prefix + session_id

    def location(self, session_id: str) -> str:
        return f"s3://{self.bucket}/{self.key(session_id)}"

    # -- Storage --------------------------------------------------------------------------------

    def open(self, session_id: str) -> S3UploadData:
        return S3UploadData(self, session_id)

    def size(self, session_id: str) -> int | None:
        committed = self._committed(self.key(session_id), with_tail=False)
        return committed.base + committed.tail if committed.marker else None

    def publish(
        self, session_id: str, filename: str, *, durable: bool, note: Callable[[str], None]
    ) -> str:
        """Complete the multipart upload (the marker's tail becomes its last part, copied inside
        S3), or copy a small upload's marker into place when it never needed a part."""
        key = self.key(session_id)
        marker = key + ".part"
        note(self.location(session_id))
        committed = self._committed(key, with_tail=False)
        parts = list(committed.parts or [])
        with s3_errors():
            if not committed.marker and not committed.upload_id and self._exists(key):
                return self.location(session_id)  # published before a crash: never overwrite it
            if not parts:
                source = {"Bucket": self.bucket, "Key": marker}
                if committed.marker:
                    self.client.copy_object(
                        Bucket=self.bucket, Key=key, CopySource=source, MetadataDirective="REPLACE"
                    )
                else:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=b"")
                if committed.upload_id:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=committed.upload_id
                    )
            else:
                if committed.tail:
                    copied = self.client.upload_part_copy(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=committed.upload_id,
                        PartNumber=len(parts) + 1,
                        CopySource={"Bucket": self.bucket, "Key": marker},
                    )
                    etag = copied["CopyPartResult"]["ETag"]
                    parts.append(_Part(len(parts) + 1, etag, committed.tail))
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=committed.upload_id,
                    MultipartUpload={
                        "Parts": [{"PartNumber": p.number, "ETag": p.etag} for p in parts]
                    },
                )
            if committed.marker:
                self.client.delete_object(Bucket=self.bucket, Key=marker)
        self._remove_buffer(session_id)
        return self.location(session_id)

    def finish_publish(
        self, session_id: str, location: str, filename: str, *, durable: bool
    ) -> str:
        return self.publish(session_id, filename, durable=durable, note=lambda _: None)

    def _exists(self, key: str) -> bool:
        try:
            with s3_errors():
                self.client.head_object(Bucket=self.bucket, Key=key)
        except FileNotFoundError:
            return False
        return True

    def discard(self, session_id: str) -> None:
        key = self.key(session_id)
        with s3_errors():
            listing = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
            for upload in listing.get("Uploads", []):
                if upload["Key"] == key:
                    with contextlib.suppress(FileNotFoundError), s3_errors():
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=key, UploadId=upload["UploadId"]
                        )
            self.client.delete_object(Bucket=self.bucket, Key=key + ".part")
        self._remove_buffer(session_id)

    def remove(self, location: str) -> None:
        with s3_errors():
            self.client.delete_object(Bucket=self.bucket, Key=self._key_of(location))

    def open_published(self, location: str | None, session_id: str) -> tuple[S3Reader, int]:
        key = self._key_of(location) if location else self.key(session_id)
        with s3_errors():
            size = self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        return S3Reader(self.client, self.bucket, key, size), size

    # -- helpers --------------------------------------------------------------------------------

    def _key_of(self, location: str) -> str:
        prefix = f"s3://{self.bucket}/"
        if not location.startswith(prefix):
            raise FileNotFoundError(errno.ENOENT, f"not in this bucket: {location}")
        return location[len(prefix) :]

    def _committed(self, key: str, *, with_tail: bool, into: int = -1) -> _Committed:
        """Read the marker (downloading its bytes into the file `into` when `with_tail`) and the
        parts below its base. No marker: nothing was ever committed."""
        committed = _Committed()
        read = self.client.get_object if with_tail else self.client.head_object
        try:
            with s3_errors():
                answer = read(Bucket=self.bucket, Key=key + ".part")
        except FileNotFoundError:
            return committed
        with s3_errors():
            committed.marker = True
            committed.tail = answer["ContentLength"]
            meta = answer.get("Metadata", {})
            base = int(meta.get("base", "0"))
            committed.upload_id = meta.get("upload-id") or None
            if with_tail:
                download(answer["Body"], into)
            if committed.upload_id is None:
                committed.parts = []
                return committed
            committed.parts = self._parts_below(key, committed.upload_id, base)
        return committed

    def _parts_below(self, key: str, upload_id: str, base: int) -> list[_Part]:
        parts: list[_Part] = []
        total = 0
        marker = 0
        while total < base:
            page = self.client.list_parts(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker
            )
            for item in page.get("Parts", []):
                if total >= base:
                    break
                part = _Part(item["PartNumber"], item["ETag"], item["Size"])
                if part.number != len(parts) + 1:
                    raise OSError(errno.EIO, f"S3: part {len(parts) + 1} of {key} is missing")
                parts.append(part)
                total += part.size
            if not page.get("IsTruncated") or total >= base:
                break
            marker = page["NextPartNumberMarker"]
        if total != base:
            raise OSError(errno.EIO, f"S3: the parts of {key} hold {total} bytes, not {base}")
        return parts

    def _remove_buffer(self, session_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.layout.partial(session_id).unlink()


class S3UploadData:
    """One upload's data: the committed parts in S3 and a local buffer of the bytes past them."""

    def __init__(self, storage: S3Storage, session_id: str) -> None:
        self.storage = storage
        self.key = storage.key(session_id)
        self.part_size = storage.settings.part_size
        self.buffer = storage.layout.partial(session_id)
        self.fd = _open_buffer(self.buffer)
        try:
            committed = storage._committed(self.key, with_tail=True, into=self.fd)
        except BaseException:
            self.close()
            raise
        self.upload_id = committed.upload_id
        self.parts = committed.parts or []
        self.base = committed.base  # bytes in self.parts
        self.front = 0  # bytes at the start of the buffer file already sent as parts
        self.changed = False  # bytes written or cut since the marker was last written

    def size(self) -> int:
        return self.base + fileio.file_size(self.fd) - self.front

    def write(self, data: memoryview, offset: int) -> None:
        if offset != self.size():
            raise OSError(errno.EINVAL, f"S3 data is appended only: {offset} != {self.size()}")
        fileio.pwrite_all(self.fd, data, self.front + offset - self.base)
        self.changed = True

    def truncate(self, size: int) -> None:
        if size < self.base:
            raise CommittedData(f"bytes below {self.base} of {self.key} are committed parts")
        os.ftruncate(self.fd, self.front + size - self.base)
        self.changed = True

    def commit(self, *, whole: bool) -> None:
        """Send full parts, then write the marker. A failure part-way leaves this handle
        consistent (sent parts are counted in `base`) and S3 at its last marker."""
        sent = False
        while fileio.file_size(self.fd) - self.front >= self.part_size:
            self._upload_part()
            sent = True
        if not (sent or (whole and self.changed)):
            return
        self._drop_front()
        tail = fileio.file_size(self.fd) if whole else 0
        with s3_errors():
            self.storage.client.put_object(
                Bucket=self.storage.bucket,
                Key=self.key + ".part",
                Body=FileSlice(self.fd, 0, tail),
                ContentLength=tail,
                Metadata={"base": str(self.base), "upload-id": self.upload_id or ""},
            )
        self.changed = not whole

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            with contextlib.suppress(FileNotFoundError):
                self.buffer.unlink()

    def _upload_part(self) -> None:
        client, bucket = self.storage.client, self.storage.bucket
        with s3_errors():
            if self.upload_id is None:
                created = client.create_multipart_upload(Bucket=bucket, Key=self.key)
                self.upload_id = created["UploadId"]
            number = len(self.parts) + 1
            answer = client.upload_part(
                Bucket=bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=FileSlice(self.fd, self.front, self.part_size),
                ContentLength=self.part_size,
            )
        self.parts.append(_Part(number, answer["ETag"], self.part_size))
        self.base += self.part_size
        self.front += self.part_size

    def _drop_front(self) -> None:
        """Keep only the buffer's bytes past the parts sent, in a fresh file."""
        if not self.front:
            return
        fresh = self.buffer.with_name(self.buffer.name + ".tmp")
        fd = _open_buffer(fresh)
        try:
            rest = fileio.file_size(self.fd) - self.front
            fileio.copy_range(self.fd, self.front, fd, 0, rest)
            os.replace(fresh, self.buffer)
        except BaseException:
            os.close(fd)
            raise
        os.close(self.fd)
        self.fd, self.front = fd, 0


def _open_buffer(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o600)
