"""Which session store and which storage a process opens, chosen by the settings, and the session
directory the front end answers from (one server, or one node of several).

The front end and every writer process open their own (a Redis connection or a boto3 client is not
shared across processes), from this one picklable description, so they can never disagree.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

from .config import Config
from .layout import Layout
from .sessions.directory import LocalDirectory, SessionDirectory
from .sessions.live import LiveSessions
from .sessions.store import FileSessionStore, SessionStore
from .storage import LocalStorage, Storage
from .storage.s3_client import S3Settings


@dataclass(frozen=True)
class Backends:
    session_store: str
    storage: str
    s3: S3Settings | None = None
    node_id: str | None = None  # set in cluster mode only (a shared session store)
    keep_finished: float = 0.0  # a shared store expires finished records after twice this

    @classmethod
    def from_config(cls, config: Config) -> Backends:
        s3 = None
        if config.storage.startswith("s3://"):
            s3 = S3Settings.from_url(
                config.storage,
                endpoint=config.s3_endpoint,
                region=config.s3_region,
                access_key=config.s3_access_key,
                secret_key=config.s3_secret_key,
                part_size=config.s3_part_size,
                max_upload_size=config.max_upload_size,
            )
        node_id = (config.node_id or default_node_id()) if config.shared else None
        return cls(config.session_store, config.storage, s3, node_id, config.keep_finished)

    @property
    def shared(self) -> bool:
        return self.node_id is not None

    def open_store(self, layout: Layout) -> SessionStore:
        if self.session_store == "file":
            return FileSessionStore(layout.sessions)
        from .sessions.redis_store import RedisSessionStore, connect

        return RedisSessionStore(connect(self.session_store), self.keep_finished)

    def open_storage(self, layout: Layout, *, writeback: bool = False) -> Storage:
        """`writeback` (writers whose data will be synced): see `LocalStorage`."""
        if self.s3 is None:
            return LocalStorage(layout, writeback=writeback)
        from .storage.s3 import S3Storage

        return S3Storage(self.s3, layout)

    def open_directory(
        self, store: SessionStore, live: LiveSessions, lease_ttl: float
    ) -> SessionDirectory:
        """The front end's session directory: one server's, or with a shared store this node's
        among several (it joins them when it `start`s)."""
        if self.node_id is None:
            return LocalDirectory(live, store)
        from .cluster.directory import ClusterDirectory
        from .cluster.node import ClusterNode
        from .sessions.redis_store import connect

        node = ClusterNode(connect(self.session_store), self.node_id, lease_ttl)
        return ClusterDirectory(store, live, node)


def default_node_id() -> str:
    """hostname-pid: unique per running server, readable in logs and in Redis."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "node"
    return f"{host}-{os.getpid()}"
