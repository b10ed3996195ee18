"""Where upload data is written and published: an interface and its backends (local files by
default; S3 in `storage.s3`, imported only when configured since boto3 is an optional extra)."""

from .base import Adopting, CommittedData, CopyingIn, ReadBack, Storage, UploadData
from .local import LocalStorage

__all__ = [
    "Adopting",
    "CommittedData",
    "CopyingIn",
    "LocalStorage",
    "ReadBack",
    "Storage",
    "UploadData",
]
