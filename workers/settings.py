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
    write_behind: int  # bytes of one upload acknowledged before they are in its data
    write_behind_total: int  # the same for all the sessions of this writer
    fsync: str
    expiry: float
    backends: Backends
