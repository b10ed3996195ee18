"""Parsers of setting values: the text of a flag or an environment variable to a checked value.

Each raises `ValueError` saying what it expected, so a bad setting stops the server at start-up.
They live apart from the table in `config` because sizes and durations are read the same way
elsewhere too (credentials, `upload-client`). `Setting`, the row of that table, lives here too, so
that rows can be kept in more than one module (`config_integrations`) without an import cycle.
"""

from __future__ import annotations

import multiprocessing
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "UPLOAD_SERVER_"


@dataclass(frozen=True)
class Setting:
    """One row of the settings table."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    metavar: str = "VALUE"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_size(text: str | int) -> int:
    """Parse a byte count such as `1048576`, `1MiB`, `512KiB` or `10GB` (SI and binary units)."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"not a size: {text!r} (use bytes or a unit: 512KiB, 1MiB, 10GB)")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if value < 0:
        raise ValueError(f"a size cannot be negative: {text!r}")
    return value


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def parse_duration(text: str | float) -> float:
    """Parse seconds, optionally with a unit: `30`, `2.5s`, `15m`, `24h`, `7d`."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", text)
        if not match:
            raise ValueError(f"not a duration: {text!r} (use seconds or 500ms, 30s, 15m, 24h, 7d)")
        scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2) or "s"]
        value = float(match.group(1)) * scale
    if value < 0:
        raise ValueError(f"a duration cannot be negative: {text!r}")
    return value


def parse_positive_int(text: str | int) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, not {value}")
    return value


def parse_positive_duration(text: str | float) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"must be more than 0 seconds, not {value}")
    return value


def parse_port(text: str | int) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"not a TCP port: {value}")
    return value


def parse_listen(text: str | tuple[str, int] | None) -> tuple[str, int] | None:
    """`HOST:PORT` (`[::1]:9100` for IPv6) to (host, port); empty is None (not set)."""
    if text is None or isinstance(text, tuple):
        return text
    value = text.strip()
    if not value:
        return None
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^\s:\[\]]+):(\d+)", value)
    if not match:
        raise ValueError(f"not HOST:PORT (or [IPv6]:PORT): {text!r}")
    host = match.group(1) or match.group(3)
    return host, parse_port(match.group(2) or match.group(4))


def parse_start_method(text: str) -> str:
    value = text.strip().lower()
    if value == "default":
        return multiprocessing.get_start_method(allow_none=False)
    if value not in multiprocessing.get_all_start_methods():
        available = ", ".join(multiprocessing.get_all_start_methods())
        raise ValueError(f"start method {value!r} is not available here (use {available})")
    return value


FSYNC_POLICIES = ("always", "on-complete", "never")


def parse_fsync_policy(text: str) -> str:
    value = text.strip().lower()
    if value not in FSYNC_POLICIES:
        raise ValueError(f"fsync policy must be one of {', '.join(FSYNC_POLICIES)}, not {text!r}")
    return value


def parse_log_level(text: str) -> str:
    value = text.strip().upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError(f"log level must be debug, info, warning or error, not {text!r}")
    return value


def parse_int(text: str | int) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must not be negative, not {value}")
    return value


def parse_optional_path(text: str | Path | None) -> Path | None:
    return Path(text) if text else None


HOOK_EVENTS = (
    *("pre-create", "post-create", "progress", "post-finish", "post-terminate"),
    *("post-receive", "pre-finish", "pre-terminate"),  # tusd's names (`post-receive` is progress)
)


def parse_hook_events(text: str | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(text, tuple):
        return text
    events = tuple(e.strip() for e in text.split(",") if e.strip())
    unknown = set(events) - set(HOOK_EVENTS)
    if unknown:
        raise ValueError(f"unknown hook events {sorted(unknown)}; use {', '.join(HOOK_EVENTS)}")
    return events


def parse_url_path(text: str) -> str:
    path = "/" + text.strip().strip("/") + "/"
    if path == "//" or not re.fullmatch(r"[A-Za-z0-9._~/-]+", path):
        raise ValueError(f"not a URL path: {text!r}")
    return path


def parse_web_path(text: str) -> str:
    """A URL path like `parse_url_path`'s, where the site root `/` is allowed too."""
    return "/" if not text.strip().strip("/") else parse_url_path(text)


def parse_origins(text: str | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(text, tuple):
        return text
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"not an origin (scheme://host[:port]): {origin!r}")
    return origins


def parse_session_store(text: str) -> str:
    value = text.strip()
    if value == "file" or re.fullmatch(r"rediss?://\S+", value):
        return value
    raise ValueError(f"session store must be 'file' or a redis:// URL, not {text!r}")


def parse_storage(text: str) -> str:
    value = text.strip()
    if value == "local" or re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?", value):
        return value
    raise ValueError(f"storage must be 'local' or s3://bucket[/prefix], not {text!r}")


def parse_optional_url(text: str) -> str:
    value = text.strip()
    if value and not re.fullmatch(r"https?://[^/\s]+/?", value):
        raise ValueError(f"not an endpoint URL (http[s]://host[:port]): {text!r}")
    return value.rstrip("/")


MIN_PART_SIZE = 5 * 1024**2  # S3's smallest part but the last


def parse_part_size(text: str | int) -> int:
    value = parse_size(text)
    if value < MIN_PART_SIZE:
        raise ValueError(f"S3 parts are at least 5MiB, not {value} bytes")
    return value


def parse_node_id(text: str) -> str:
    value = text.strip()
    if value and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise ValueError(f"a node id is 1-64 letters, digits, '.', '_' or '-', not {text!r}")
    return value


def parse_lease_ttl(text: str | float) -> float:
    value = parse_duration(text)
    if value < 1:
        raise ValueError(f"a lease lasts at least 1s, not {value}s")
    return value


def parse_log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in {"auto", "json", "text"}:
        raise ValueError(f"log format must be auto, json or text, not {text!r}")
    return value
