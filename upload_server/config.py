"""One table of settings: it produces the CLI flags, the environment variables and the defaults.

Every setting `name` is read, in order of precedence, from the CLI flag `--name-with-dashes`, the
environment variable `UPLOAD_SERVER_NAME`, and its default. `PORT` (set by PaaS routers) is honoured
for the port when `UPLOAD_SERVER_PORT` is not set. Invalid values fail at start-up with a clear
`ValueError`, never later in a request.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config_integrations import INTEGRATION_SETTINGS
from .config_values import (
    Setting,
    parse_bool,
    parse_duration,
    parse_fsync_policy,
    parse_hook_events,
    parse_int,
    parse_lease_ttl,
    parse_listen,
    parse_log_format,
    parse_log_level,
    parse_node_id,
    parse_optional_path,
    parse_optional_url,
    parse_origins,
    parse_part_size,
    parse_port,
    parse_positive_duration,
    parse_positive_int,
    parse_session_store,
    parse_size,
    parse_start_method,
    parse_storage,
    parse_url_path,
    parse_web_path,
)


def _cpu_count() -> int:
    return os.cpu_count() or 1


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "host",
        str,
        "127.0.0.1",
        "Address to listen on (0.0.0.0 for all IPv4, :: for IPv6).",
        "HOST",
    ),
    Setting(
        "port", parse_port, 8080, "TCP port; PaaS routers set PORT, which is honoured too.", "PORT"
    ),
    Setting(
        "upload_dir", Path, Path("uploads"), "Where finished files, spool and records live.", "DIR"
    ),
    Setting(
        "chunk_size", parse_size, 1024**2, "Bytes a writer copies between control checks.", "SIZE"
    ),
    Setting("writers", parse_positive_int, None, "Writer processes (default: the CPU count).", "N"),
    Setting(
        "max_upload_size", parse_size, 16 * 1024**3, "Largest file accepted (413 beyond).", "SIZE"
    ),
    Setting(
        "max_bytes_per_second", parse_size, 0, "Per-session write rate limit; 0 = none.", "SIZE"
    ),
    Setting(
        "write_behind",
        parse_size,
        64 * 1024**2,
        "Bytes of one tus upload acknowledged once spooled (named in its record) before its "
        "writer has copied them into the data; 0 (or a --max-bytes-per-second) = answer each "
        "PATCH only after the copy.",
        "SIZE",
    ),
    Setting(
        "write_behind_total",
        parse_size,
        1024**3,
        "The same across all uploads (shared evenly by the writers).",
        "SIZE",
    ),
    Setting(
        "writer_stall_timeout",
        parse_duration,
        10.0,
        "A writer holding work with no heartbeat or progress this long is killed and replaced.",
        "DURATION",
    ),
    Setting(
        "threads",
        parse_positive_int,
        32,
        "waitress request threads (keep status answering under load).",
        "N",
    ),
    Setting(
        "recv_bytes", parse_size, 256 * 1024, "waitress socket read size (intake speed).", "SIZE"
    ),
    Setting(
        "start_method", parse_start_method, "default", "multiprocessing start method.", "METHOD"
    ),
    Setting(
        "fsync",
        parse_fsync_policy,
        "on-complete",
        "When data is fsynced: always, on-complete, never.",
        "POLICY",
    ),
    Setting("log_level", parse_log_level, "INFO", "debug, info, warning or error.", "LEVEL"),
    Setting(
        "log_format",
        parse_log_format,
        "auto",
        "json, text, or auto (text on a terminal).",
        "FORMAT",
    ),
    Setting("tus_path", parse_url_path, "/files/", "Where the tus endpoint lives.", "PATH"),
    Setting(
        "cors_origins", parse_origins, "*", "Origins allowed by CORS: * or a comma list.", "LIST"
    ),
    Setting(
        "expiry",
        parse_duration,
        "24h",
        "Incomplete uploads expire after this long without progress (0 = never).",
        "DURATION",
    ),
    Setting("max_metadata_size", parse_size, 4096, "Largest tus Upload-Metadata header.", "SIZE"),
    Setting("auth", parse_bool, False, "Require a bearer API key or signed upload token.", "BOOL"),
    Setting("api_keys", str, "", "API keys as name=sha256hex pairs, comma separated.", "LIST"),
    Setting(
        "api_keys_file",
        parse_optional_path,
        None,
        "File of API keys: one 'name sha256hex' a line.",
        "FILE",
    ),
    Setting("token_secret", str, "", "HMAC secret for HS256 JWT upload tokens.", "SECRET"),
    *INTEGRATION_SETTINGS,
    Setting(
        "metrics_auth",
        parse_bool,
        False,
        "/metrics needs an API key (an upload token is refused).",
        "BOOL",
    ),
    Setting(
        "metrics_listen",
        parse_listen,
        "",
        "Serve /metrics (with /healthz, /readyz) on this HOST:PORT, not on the main one.",
        "HOST:PORT",
    ),
    Setting("max_sessions", parse_int, 10000, "Most unfinished sessions in all (429 beyond).", "N"),
    Setting(
        "max_sessions_per_owner",
        parse_int,
        1000,
        "Most unfinished sessions per credential (auth off: per client address, IPv6 per /64).",
        "N",
    ),
    Setting(
        "min_free_space",
        parse_size,
        256 * 1024**2,
        "Refuse uploads that would leave less free disk (507).",
        "SIZE",
    ),
    Setting(
        "idle_timeout",
        parse_duration,
        120.0,
        "Close connections idle this long (slow clients).",
        "DURATION",
    ),
    Setting(
        "header_timeout",
        parse_duration,
        30.0,
        "A request's headers must be complete this long after its first byte (0 = off).",
        "DURATION",
    ),
    Setting(
        "min_body_rate",
        parse_size,
        1024,
        "Close a connection sending a body slower than this many bytes/s (0 = off).",
        "SIZE",
    ),
    Setting(
        "min_body_rate_window",
        parse_positive_duration,
        60.0,
        "The window --min-body-rate is measured over (checked after the first).",
        "DURATION",
    ),
    Setting(
        "max_connections",
        parse_positive_int,
        2048,
        "Most open connections (503 beyond); lowered to the open-file limit.",
        "N",
    ),
    Setting(
        "max_connections_per_client",
        parse_int,
        256,
        "Most open connections per client address, IPv6 per /64 (429 beyond; 0 = no cap).",
        "N",
    ),
    Setting(
        "max_header_size",
        parse_size,
        64 * 1024,
        "Largest request header block (431 beyond).",
        "SIZE",
    ),
    Setting(
        "trusted_proxy",
        str,
        "",
        "Address of a proxy whose X-Forwarded-* headers are trusted (* for any).",
        "ADDR",
    ),
    Setting(
        "trusted_proxy_count",
        parse_positive_int,
        1,
        "Proxies in front of the server that add headers.",
        "N",
    ),
    Setting(
        "trusted_proxy_headers",
        str,
        "x-forwarded-for x-forwarded-host x-forwarded-proto x-forwarded-port",
        "Proxy headers to trust.",
        "LIST",
    ),
    Setting("hook_url", str, "", "Webhook receiver URL for upload events.", "URL"),
    Setting("hook_secret", str, "", "HMAC-SHA256 key that signs webhook bodies.", "SECRET"),
    Setting(
        "hook_events",
        parse_hook_events,
        "pre-create,post-create,progress,post-finish,post-terminate",
        "Events sent to the webhook.",
        "LIST",
    ),
    Setting("hook_timeout", parse_duration, 5.0, "Webhook request timeout.", "DURATION"),
    Setting("hook_retries", parse_int, 5, "Webhook delivery attempts after the first.", "N"),
    Setting(
        "hook_callable", str, "", "module:function called with every event (for embedders).", "NAME"
    ),
    Setting(
        "session_store",
        parse_session_store,
        "file",
        "Where session records live: file, or redis://host:port/db (several nodes).",
        "STORE",
    ),
    Setting(
        "storage",
        parse_storage,
        "local",
        "Where upload data lives: local, or s3://bucket/prefix.",
        "STORAGE",
    ),
    Setting("s3_endpoint", parse_optional_url, "", "S3 endpoint URL (empty: AWS).", "URL"),
    Setting("s3_region", str, "", "S3 region (empty: the AWS default chain).", "REGION"),
    Setting("s3_access_key", str, "", "S3 access key (empty: AWS_ACCESS_KEY_ID etc.).", "KEY"),
    Setting("s3_secret_key", str, "", "S3 secret key (empty: AWS_SECRET_ACCESS_KEY etc.).", "KEY"),
    Setting(
        "s3_part_size", parse_part_size, 8 * 1024**2, "S3 multipart part size (>= 5MiB).", "SIZE"
    ),
    Setting(
        "node_id", parse_node_id, "", "This node's name in a cluster (default hostname-pid).", "ID"
    ),
    Setting(
        "lease_ttl",
        parse_lease_ttl,
        30.0,
        "How long a node's lock on an upload lasts unless renewed.",
        "DURATION",
    ),
    Setting(
        "portable",
        parse_bool,
        False,
        "Turn off every Linux-only fast path, as on Windows (for tests; see README).",
        "BOOL",
    ),
    Setting("web", parse_bool, True, "Serve the upload page (false turns it off).", "BOOL"),
    Setting("web_path", parse_web_path, "/", "Where the upload page lives.", "PATH"),
    # history: how long a finished session stays in the live view and on disk
    Setting(
        "live_grace",
        parse_duration,
        60.0,
        "A finished session leaves the live view (memory) after this long; its record answers.",
        "DURATION",
    ),
    Setting(
        "keep_finished",
        parse_duration,
        "7d",
        "A finished record becomes a tombstone after this long, removed as long again later (0 = never).",
        "DURATION",
    ),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    """The settings in force. Build it with `Config.load()`; defaults come from `SETTINGS` only."""

    host: str
    port: int
    upload_dir: Path
    chunk_size: int
    writers: int
    max_upload_size: int
    max_bytes_per_second: int
    write_behind: int
    write_behind_total: int
    writer_stall_timeout: float
    threads: int
    recv_bytes: int
    start_method: str
    fsync: str
    log_level: str
    log_format: str
    tus_path: str
    cors_origins: tuple[str, ...]
    expiry: float
    max_metadata_size: int
    auth: bool
    api_keys: str
    api_keys_file: Path | None
    token_secret: str
    jwt_public_key: Path | None
    jwks_url: str
    jwt_algorithms: tuple[str, ...]
    jwt_issuer: str
    jwt_audience: str
    jwt_owner_claim: str
    jwt_limit_claims: tuple[tuple[str, str], ...]
    jwt_leeway: float
    jwks_refresh_limit: float
    jwks_cache_time: float
    hook_format: str
    metrics_auth: bool
    metrics_listen: tuple[str, int] | None
    max_sessions: int
    max_sessions_per_owner: int
    min_free_space: int
    idle_timeout: float
    header_timeout: float
    min_body_rate: int
    min_body_rate_window: float
    max_connections: int
    max_connections_per_client: int
    max_header_size: int
    trusted_proxy: str
    trusted_proxy_count: int
    trusted_proxy_headers: str
    hook_url: str
    hook_secret: str
    hook_events: tuple[str, ...]
    hook_timeout: float
    hook_retries: int
    hook_callable: str
    session_store: str
    storage: str
    s3_endpoint: str
    s3_region: str
    s3_access_key: str
    s3_secret_key: str
    s3_part_size: int
    node_id: str
    lease_ttl: float
    portable: bool
    web: bool
    web_path: str
    live_grace: float
    keep_finished: float

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be at least 1 byte")
        if self.max_upload_size < 1:
            raise ValueError("max_upload_size must be at least 1 byte")
        if self.writer_stall_timeout <= 0:
            raise ValueError("writer_stall_timeout must be above 0")
        if self.shared and self.storage == "local":
            raise ValueError(
                "--session-store redis:// shares uploads between nodes, so their data must be "
                "shared too: set --storage s3://bucket/prefix"
            )
        if self.web and self.web_path in (self.tus_path, "/upload/"):
            raise ValueError(f"web_path {self.web_path} is taken by an API")

    @property
    def shared(self) -> bool:
        """True when several nodes share the session records (cluster mode)."""
        return self.session_store != "file"

    @classmethod
    def load(
        cls,
        argv: Sequence[str] | None = None,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Config:
        """Settings from CLI flags (if `argv` is given), then the environment, then defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = environ.get(setting.env)
            if raw is None and setting.name == "port":
                raw = environ.get("PORT")
            if raw is not None and raw != "":
                values[setting.name] = _convert(setting, raw)
        if argv is not None:
            parsed = build_parser().parse_args(argv)
            for setting in SETTINGS:
                raw = getattr(parsed, setting.name)
                if raw is not None:
                    values[setting.name] = _convert(setting, raw)
        for name, raw in overrides.items():
            if name not in _BY_NAME:
                raise TypeError(f"unknown setting {name!r}")
            values[name] = raw if not isinstance(raw, str) else _convert(_BY_NAME[name], raw)
        explicit_start_method = "start_method" in values
        for setting in SETTINGS:
            if setting.name not in values:
                default = setting.default
                values[setting.name] = (
                    setting.parse(default) if isinstance(default, str) else default
                )
        if values["writers"] is None:
            values["writers"] = _cpu_count()
        if values["portable"] and not explicit_start_method:
            values["start_method"] = "spawn"  # what Windows has
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _convert(setting: Setting, raw: Any) -> Any:
    try:
        return setting.parse(raw)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{setting.flag} / {setting.env}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upload-server",
        description="Resumable file upload server (seed API and tus 1.0).",
        epilog="Every flag can also be set as an environment variable: --chunk-size is "
        "UPLOAD_SERVER_CHUNK_SIZE. Sizes take units (512KiB, 1MiB, 10GB). Other commands: "
        "upload-server keygen|token|import-tusd --help.",
    )
    for setting in SETTINGS:
        default = setting.default if setting.default is not None else "auto"
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            metavar=setting.metavar,
            default=None,
            help=f"{setting.help} [env {setting.env}; default {default}]",
        )
    return parser
