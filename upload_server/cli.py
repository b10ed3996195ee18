"""`upload-server`: serve the app with waitress, tuned for large request bodies.

waitress reads each request body on its single I/O thread before the app runs; with its defaults
(8 KiB socket reads) that thread, not the app, limits intake. `recv_bytes` of 256 KiB roughly triples
single-stream intake, more `threads` keep status and HEAD answering while PATCHes wait for writers,
and `max_request_body_size` must follow the upload limit (waitress's own default of 1 GiB would
silently cap uploads). See docs/PERFORMANCE.md for the measurements. The server is ours
(`waitress_server.create_server`), so the waitress adjustments apply to it alone.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import waitress

from . import credentials, import_tusd, waitress_server
from .app import start_app
from .config import Config
from .runtime import DirectoryLocked

log = logging.getLogger("upload_server")

MULTIPART_OVERHEAD = 1024**2  # room for multipart framing around the largest allowed file


def waitress_options(config: Config) -> dict[str, Any]:
    """The waitress settings that go with `config` (also used by the benchmark)."""
    options: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "threads": config.threads,
        "recv_bytes": config.recv_bytes,
        "max_request_body_size": config.max_upload_size + MULTIPART_OVERHEAD,
        "max_request_header_size": config.max_header_size,
        "channel_timeout": config.idle_timeout,
        "cleanup_interval": max(1.0, min(30.0, config.idle_timeout / 2)),
        "ident": "upload_server",
        "asyncore_use_poll": not config.portable,  # select(), as on Windows, when portable
        "clear_untrusted_proxy_headers": True,
    }
    if config.trusted_proxy:
        options.update(
            trusted_proxy=config.trusted_proxy,
            trusted_proxy_count=config.trusted_proxy_count,
            trusted_proxy_headers=config.trusted_proxy_headers,
        )
    return options


def serve_metrics(app: Any, host: str, port: int, *, portable: bool) -> Any:
    """The `--metrics-listen` listener, started: a plain waitress server with its own I/O thread
    and two request threads, so a scrape neither queues behind uploads nor goes through what
    the upload listener does to bodies (it takes none)."""
    server = waitress.create_server(
        app,
        host=host,
        port=port,
        threads=2,
        ident="upload_server",
        asyncore_use_poll=not portable,  # select() fails on descriptors past 1023
        max_request_body_size=64 * 1024,
    )
    threading.Thread(target=server.run, name="metrics-listener", daemon=True).start()
    return server


def _log_listening(server: Any, what: str) -> None:
    for host, port in getattr(server, "effective_listen", None) or [
        (server.effective_host, server.effective_port)
    ]:
        log.info("%s on http://%s:%s", what, f"[{host}]" if ":" in host else host, port)


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in credentials.COMMANDS:
        return credentials.main(args)
    if args and args[0] == "import-tusd":
        return import_tusd.main(args[1:])
    try:
        config = Config.load(args)
    except ValueError as exc:
        print(f"upload-server: {exc}", file=sys.stderr)
        return 2
    try:
        app = start_app(config)
    except ValueError as exc:
        print(f"upload-server: {exc}", file=sys.stderr)
        return 2
    except DirectoryLocked as exc:
        print(f"upload-server: {exc}", file=sys.stderr)
        return 1
    try:
        server = waitress_server.create_server(app, app.server_policy, **waitress_options(config))
    except OSError as exc:
        app.runtime.close()
        print(
            f"upload-server: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr
        )
        return 1
    metrics_server = None
    if config.metrics_listen is not None:
        host, port = config.metrics_listen
        try:
            metrics_server = serve_metrics(app.metrics_app, host, port, portable=config.portable)
        except OSError as exc:
            server.close()
            app.runtime.close()
            print(
                f"upload-server: cannot listen on {host}:{port} (--metrics-listen): {exc}",
                file=sys.stderr,
            )
            return 1

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(
        signal.SIGINT, stop
    )  # also when started with SIGINT ignored (`cmd &` in a script)
    if hasattr(signal, "SIGBREAK"):  # Windows: CTRL_BREAK_EVENT
        signal.signal(signal.SIGBREAK, stop)
    _log_listening(server, "listening")
    if metrics_server is not None:
        _log_listening(metrics_server, "/metrics (and /healthz, /readyz) listening")
    try:
        server.run()  # returns on Ctrl-C or SIGTERM: waitress catches the KeyboardInterrupt
    except KeyboardInterrupt:
        pass  # raised between waitress's loop and its own handler
    finally:
        log.info("shutting down: writers checkpoint their sessions")
        server.close()
        if metrics_server is not None:
            metrics_server.close()
        app.runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
