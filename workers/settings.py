"""What a writer process is told when it starts: one picklable value, so `spawn` can send it."""

from __future__ import annotations

from dataclasses import dataclass

from upload_server.backends import Backends


@dataclass(frozen=True)
class WriterSettings:
    index: int
    upload_dir: str
    chunk_size: int
    max_bytes_per_second: int
    fsync: str
    expiry: float
    backends: Backends
