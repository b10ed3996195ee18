"""The application factory: `create_app()` builds the Falcon app and the processes behind it.

`waitress-serve --call upload_server:create_app` calls it with no arguments (settings then come
from the environment); `upload-server` and the tests pass a `Config`. The processes it starts are
stopped by `app.runtime.close()`, which also runs at interpreter exit.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable
from typing import Any

import falcon

from . import connection_limits, errors, logs, metrics, portable, waitress_patches
from .api import health, middleware, openapi, refusals, seed, tus, web
from .auth import Authenticator
from .clients import client_key, explicit_proxies
from .config import Config
from .cut_bodies import CutBodies
from .hooks import Hooks
from .layout import Layout
from .runtime import Runtime


class UploadApp(falcon.App):
    """A Falcon app that carries the runtime it depends on, so its owner can stop it."""

    runtime: Runtime


def create_app(
    config: Config | None = None,
    *,
    hook: Callable[[str, dict[str, Any]], None] | None = None,
    **overrides: Any,
) -> UploadApp:
    """Build the app. `hook` is called with every upload event (see `hooks`); a pre-create hook
    refuses an upload by raising `upload_server.hooks.HookRejected`."""
    config = config if config is not None else Config.load(**overrides)
    portable.configure(config.portable)  # before any process starts: they inherit it
    logs.configure(config.log_level, config.log_format)
    layout = Layout(config.upload_dir.absolute())
    layout.create()
    metrics.setup(layout.internal / "metrics")
    cors = middleware.Cors(config.cors_origins, config.tus_path)
    authenticator = Authenticator(config)
    runtime = Runtime(config, Hooks(config, hook)).start()
    cut_bodies = CutBodies(config.tus_path)
    forwarding = explicit_proxies(config.trusted_proxy)
    waitress_patches.install(
        layout.spool_dir,
        cors.allow_origin,
        runtime.uploads.space_refusal,
        cut_bodies,
        connection_limits.Limits(
            max_connections=config.max_connections,
            max_connections_per_client=config.max_connections_per_client,
            header_timeout=config.header_timeout,
            min_body_rate=config.min_body_rate,
            min_body_rate_window=config.min_body_rate_window,
            uncapped=frozenset(filter(None, [client_key(proxy) for proxy in forwarding])),
        ),
    )
    atexit.register(runtime.close)
    runtime.on_close(cut_bodies.close)
    app = UploadApp(
        middleware=[
            middleware.RequestLog(),
            cors,
            middleware.Authenticate(authenticator, ("/upload", config.tus_path), config.tus_path),
            middleware.MethodOverride(),
            middleware.TusVersion(config.tus_path),
            *(
                [middleware.ForwardedClientShare(config.max_connections_per_client)]
                if forwarding and config.max_connections_per_client
                else []
            ),
        ]
    )
    app.runtime = runtime
    app.req_options.auto_parse_qs_csv = False
    app.resp_options.secure_cookies_by_default = False
    errors.install(app)
    refusals.install(app, config.tus_path)
    uploads = runtime.uploads
    app.add_route("/upload", seed.UploadResource(uploads))
    app.add_route("/upload/status", seed.StatusResource(uploads))
    app.add_route("/upload/pause", seed.PauseResource(uploads))
    app.add_route("/upload/resume", seed.ResumeResource(uploads))
    app.add_route("/upload/terminate", seed.TerminateResource(uploads))
    locks = runtime.cluster.locks if runtime.cluster is not None else tus.UploadLocks()
    app.add_route(config.tus_path.rstrip("/"), tus.TusCollection(uploads, locks))
    app.add_route(config.tus_path, tus.TusCollection(uploads, locks))
    app.add_route(config.tus_path + "{upload_id}", tus.TusUpload(uploads, locks, cut_bodies))
    app.add_route("/openapi.json", openapi.OpenApiResource(config))
    app.add_route("/metrics", health.MetricsResource(runtime))
    app.add_route("/healthz", health.HealthResource())
    app.add_route("/readyz", health.ReadyResource(runtime))
    if config.web:
        web.add_routes(app, config)
    cut_bodies.app = app
    return app
