"""Reaching S3 and moving bytes to and from it: the bucket's settings, the boto3 client, its errors
as the OSErrors writers already handle, and the file-like streams boto3 reads and writes.

Nothing here knows how an upload is laid out in the bucket (that is `storage.s3`). boto3 is imported
only when a client is made or an error is translated, since it is an optional extra.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .. import fileio, metrics

MAX_PARTS = 10_000
MiB = 1024 * 1024
_COPY_BLOCK = MiB
_MISSING = {"NoSuchKey", "NoSuchUpload", "NotFound", "404"}


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach the bucket; `part_size` is already raised to cover the largest
    upload in 10,000 parts."""

    bucket: str
    prefix: str
    endpoint: str
    region: str
    access_key: str
    secret_key: str
    part_size: int

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        endpoint: str = "",
        region: str = "",
        access_key: str = "",
        secret_key: str = "",
        part_size: int,
        max_upload_size: int = 0,
    ) -> S3Settings:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        prefix = prefix.strip("/")
        return cls(
            bucket=bucket,
            prefix=prefix + "/" if prefix else "",
            endpoint=endpoint,
            region=region or ("us-east-1" if endpoint else ""),
            access_key=access_key,
            secret_key=secret_key,
            part_size=part_size_for(part_size, max_upload_size),
        )


def part_size_for(configured: int, max_upload_size: int) -> int:
    """The configured part size, raised to a whole MiB that fits the largest upload in 10,000."""
    needed = math.ceil(max_upload_size / MAX_PARTS / MiB) * MiB
    return max(configured, needed, 5 * MiB)


def make_client(settings: S3Settings) -> Any:
    """A boto3 S3 client whose every call is counted in `upload_server_s3_requests_total`."""
    import boto3
    from botocore.config import Config as BotoConfig

    config = BotoConfig(
        s3={"addressing_style": "path" if settings.endpoint else "auto"},
        retries={"max_attempts": 5, "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=32,
    )
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint or None,
        region_name=settings.region or None,
        aws_access_key_id=settings.access_key or None,
        aws_secret_access_key=settings.secret_key or None,
        config=config,
    )
    counter = metrics.get().s3_requests
    client.meta.events.register(
        "before-call.s3", lambda model, **_: counter.labels(model.name).inc()
    )
    return client


@contextlib.contextmanager
def s3_errors() -> Iterator[None]:
    """Turn botocore's errors into the OSErrors writers already handle (missing: FileNotFound)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _MISSING:
            raise FileNotFoundError(errno.ENOENT, str(exc)) from exc
        raise OSError(errno.EIO, f"S3: {exc}") from exc
    except BotoCoreError as exc:
        raise OSError(errno.EIO, f"S3: {exc}") from exc


def download(body: Any, fd: int) -> None:
    """Write a GET's streaming `body` into file `fd` from its start, a block at a time."""
    offset = 0
    with s3_errors():
        for block in body.iter_chunks(_COPY_BLOCK):
            fileio.pwrite_all(fd, block, offset)
            offset += len(block)


class _Seekable(io.RawIOBase):
    """A read-only stream of `length` bytes with a position; subclasses read at `pos`."""

    length = 0
    pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self._moved(max(0, min(self.length, base + offset)))
        return self.pos

    def _moved(self, target: int) -> None:
        self.pos = target


class FileSlice(_Seekable):
    """Bytes [start, start + length) of a file, for boto3 to stream (and rewind on a retry)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.length - self.pos)
        if n <= 0:
            return 0
        data = fileio.pread(self.fd, n, self.start + self.pos)  # os.pread is not on Windows
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


class S3Reader(_Seekable):
    """An object as a seekable stream: each run of reads is one ranged GET from where the last
    seek left it, so a Range download fetches only its range."""

    def __init__(self, client: Any, bucket: str, key: str, size: int) -> None:
        super().__init__()
        self.client, self.bucket, self.key, self.length = client, bucket, key, size
        self.pos = 0
        self.body: Any = None

    def _moved(self, target: int) -> None:
        if target != self.pos:
            self._drop_body()
            self.pos = target

    def readinto(self, buffer: Any) -> int:
        if self.pos >= self.length or len(buffer) == 0:
            return 0
        if self.body is None:
            with s3_errors():
                self.body = self.client.get_object(
                    Bucket=self.bucket, Key=self.key, Range=f"bytes={self.pos}-"
                )["Body"]
        with s3_errors():
            data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        self._drop_body()
        super().close()

    def _drop_body(self) -> None:
        if self.body is not None:
            with contextlib.suppress(Exception):
                self.body.close()
            self.body = None
