"""The application factory: `create_app()` builds the Falcon app and the processes behind it.

`waitress-serve --call upload_server:create_app` calls it with no arguments (settings then come
from the environment); `upload-server` and the tests pass a `Config`. The processes it starts are
stopped by `app.runtime.close()`, which also runs at interpreter exit.
"""

from __future__ import annotations

import atexit
import logging
from typing import Any

import falcon

from . import errors, waitress_patches
from .api import health, middleware, seed, tus
from .config import Config
from .runtime import Runtime


class UploadApp(falcon.App):
    """A Falcon app that carries the runtime it depends on, so its owner can stop it."""

    runtime: Runtime


def create_app(config: Config | None = None, **overrides: Any) -> UploadApp:
    config = config if config is not None else Config.load(**overrides)
    _configure_logging(config.log_level)
    waitress_patches.install()
    runtime = Runtime(config).start()
    atexit.register(runtime.close)
    app = UploadApp(
        middleware=[
            middleware.Cors(config.cors_origins),
            middleware.MethodOverride(),
            middleware.TusVersion(config.tus_path),
        ]
    )
    app.runtime = runtime
    app.req_options.auto_parse_qs_csv = False
    app.resp_options.secure_cookies_by_default = False
    errors.install(app)
    uploads = runtime.uploads
    app.add_route("/upload", seed.UploadResource(uploads))
    app.add_route("/upload/status", seed.StatusResource(uploads))
    app.add_route("/upload/pause", seed.PauseResource(uploads))
    app.add_route("/upload/resume", seed.ResumeResource(uploads))
    app.add_route("/upload/terminate", seed.TerminateResource(uploads))
    locks = tus.UploadLocks()
    app.add_route(config.tus_path.rstrip("/"), tus.TusCollection(uploads, locks))
    app.add_route(config.tus_path, tus.TusCollection(uploads, locks))
    app.add_route(config.tus_path + "{upload_id}", tus.TusUpload(uploads, locks))
    app.add_route("/healthz", health.HealthResource())
    app.add_route("/readyz", health.ReadyResource(runtime))
    return app


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("upload_server").setLevel(level)
