"""Where upload data is written and published: an interface and its local-filesystem default."""

from .base import Storage, UploadData
from .local import LocalStorage

__all__ = ["LocalStorage", "Storage", "UploadData"]
