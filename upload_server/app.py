"""The application factories: `build_app` builds the Falcon app around what it serves; `start_app`
and `create_app` also start the processes behind it.

- `build_app(config, service, health)` adds middleware, error handlers and routes, and nothing else:
  it starts no process and patches nothing, so a test can build the app around an in-process
  service (`falcon.testing`).
- `start_app(config)` starts the `Runtime` (Manager, writers, sweeper) and builds the app around
  it. The waitress adjustments it needs travel with the app (`app.server_policy`) for whoever
  creates the server: `upload-server` gives them to its own server (`waitress_server.create_server`).
- `create_app()` is `start_app` plus those adjustments installed process-wide, for
  `waitress-serve --call upload_server:create_app`, which calls it with no arguments (settings
  then come from the environment) and creates a server we do not control.
- With `--metrics-listen`, `/metrics` leaves the app for `app.metrics_app` (`build_metrics_app`),
  which `upload-server` serves on that address; under `waitress-serve` nothing can serve it.

The processes are stopped by `app.runtime.close()`, which also runs at interpreter exit.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Callable
from typing import Any

import falcon

from . import connection_limits, errors, logs, metrics, portable, waitress_patches, waitress_server
from .api import draft, health, middleware, openapi, refusals, seed, tus, web
from .auth import Authenticator
from .clients import client_key, explicit_proxies
from .config import Config
from .cut_bodies import CutBodies
from .hooks import Hooks
from .hooks_tusd import HookRequests
from .interim import InterimResponses
from .layout import Layout
from .locks import Locks, UploadLocks
from .runtime import Runtime
from .seed_follow import SeedFollower
from .service import SessionService

log = logging.getLogger("upload_server")


class UploadApp(falcon.App):
    """A Falcon app that carries the runtime it depends on, so its owner can stop it, and the
    waitress adjustments its server needs."""

    runtime: Runtime
    server_policy: waitress_patches.ServerPolicy
    metrics_app: falcon.App | None  # what `--metrics-listen` serves


def build_app(
    config: Config,
    service: SessionService,
    health_source: health.HealthSource,
    *,
    cut_bodies: CutBodies | None = None,
    locks: Locks | None = None,
    interim: InterimResponses | None = None,
) -> UploadApp:
    """The app serving `service` (both protocols), with `/readyz` and `/metrics` reading
    `health_source`. `cut_bodies` replays cut tus bodies through this app (a server's channels
    offer them to it; without a server none arrive); `locks` serialize a tus upload's requests
    (one process's own by default; the cluster's leases with several nodes); `interim` creates
    an IETF draft upload for its 104 through this app."""
    cut_bodies = cut_bodies if cut_bodies is not None else CutBodies(config.tus_path)
    locks = locks if locks is not None else UploadLocks()
    forwarding = explicit_proxies(config.trusted_proxy)
    app = UploadApp(
        middleware=[
            middleware.RequestLog(),
            middleware.Cors(config.cors_origins, config.tus_path),
            # before authentication, which must judge the method the request will have (a GET
            # overridden to DELETE must not pass as a download that may carry ?access_token)
            middleware.MethodOverride(),
            _authenticate(
                config, ("/upload", config.tus_path), with_metrics=config.metrics_listen is None
            ),
            middleware.TusVersion(config.tus_path),
            *([HookRequests()] if config.hook_format == "tusd" else []),
            *(
                [middleware.ForwardedClientShare(config.max_connections_per_client)]
                if forwarding and config.max_connections_per_client
                else []
            ),
        ]
    )
    app.req_options.auto_parse_qs_csv = False
    app.resp_options.secure_cookies_by_default = False
    errors.install(app)
    refusals.install(app, config.tus_path)
    app.add_route("/upload", seed.UploadResource(service))
    app.add_route("/upload/status", seed.StatusResource(service))
    app.add_route("/upload/pause", seed.PauseResource(service))
    app.add_route("/upload/resume", seed.ResumeResource(service))
    app.add_route("/upload/terminate", seed.TerminateResource(service))
    drafts = draft.DraftResources(service, locks, cut_bodies)
    collection = draft.CollectionRoute(tus.TusCollection(service, locks), drafts)
    app.add_route(config.tus_path.rstrip("/"), collection)
    app.add_route(config.tus_path, collection)
    upload = draft.UploadRoute(tus.TusUpload(service, locks, cut_bodies), drafts)
    app.add_route(config.tus_path + "{upload_id}", upload)
    app.add_route("/openapi.json", openapi.OpenApiResource(config))
    _add_operations(app, health_source, with_metrics=config.metrics_listen is None)
    if config.web:
        web.add_routes(app, config)
    cut_bodies.app = app
    if interim is not None:
        interim.app = app
    return app


def build_metrics_app(config: Config, health_source: health.HealthSource) -> falcon.App:
    """What `--metrics-listen` serves: `/metrics`, `/healthz` and `/readyz`, and 404 elsewhere."""
    app = falcon.App(
        middleware=[middleware.RequestLog(), _authenticate(config, (), with_metrics=True)]
    )
    errors.install(app)
    _add_operations(app, health_source, with_metrics=True)
    return app


def _authenticate(
    config: Config, protected: tuple[str, ...], *, with_metrics: bool
) -> middleware.Authenticate:
    """Credentials on `protected` paths, and an API key on `/metrics` with `--metrics-auth` (where
    it is served: elsewhere it is a 404 like any unknown path)."""
    operator = ("/metrics",) if config.metrics_auth and with_metrics else ()
    return middleware.Authenticate(Authenticator(config), protected, config.tus_path, operator)


def _add_operations(app: falcon.App, source: health.HealthSource, *, with_metrics: bool) -> None:
    if with_metrics:
        app.add_route("/metrics", health.MetricsResource(source))
    app.add_route("/healthz", health.HealthResource())
    app.add_route("/readyz", health.ReadyResource(source))


def start_app(
    config: Config, *, hook: Callable[[str, dict[str, Any]], None] | None = None
) -> UploadApp:
    """Start the runtime and build the app around it; waitress is left as it is (see
    `app.server_policy`). `hook` is called with every upload event (see `hooks`); a pre-create
    hook refuses an upload by raising `upload_server.hooks.HookRejected`."""
    portable.configure(config.portable)  # before any process starts: they inherit it
    logs.configure(config.log_level, config.log_format)
    layout = Layout(config.upload_dir.absolute())
    layout.create()
    metrics.setup(layout.internal / "metrics")
    runtime = Runtime(config, Hooks(config, hook)).start()
    atexit.register(runtime.close)
    cut_bodies = CutBodies(config.tus_path)
    runtime.on_close(cut_bodies.close)
    interim = InterimResponses(config.tus_path)
    interim.limit = draft.limit_of(config)
    runtime.on_close(interim.close)
    assert runtime.service is not None and runtime.directory is not None
    locks = runtime.directory.locks
    app = build_app(
        config, runtime.service, runtime, cut_bodies=cut_bodies, locks=locks, interim=interim
    )
    app.runtime = runtime
    app.server_policy = _server_policy(config, layout, runtime.service, cut_bodies, interim)
    app.metrics_app = build_metrics_app(config, runtime) if config.metrics_listen else None
    return app


def _server_policy(
    config: Config,
    layout: Layout,
    service: SessionService,
    cut_bodies: CutBodies,
    interim: InterimResponses,
) -> waitress_patches.ServerPolicy:
    """What the server's connections ask of the app before it sees a request (see
    `waitress_patches`)."""
    return waitress_patches.ServerPolicy(
        spool_dir=layout.spool_dir,
        allow_origin=middleware.Cors(config.cors_origins, config.tus_path).allow_origin,
        admit=service.space_refusal,
        observer=cut_bodies,
        interim=interim,
        splitter=SeedFollower(
            service.pool, layout.spool_dir, follow=not config.max_bytes_per_second
        )
        if SeedFollower.available()
        else None,
        limits=connection_limits.Limits(
            max_connections=config.max_connections,
            max_connections_per_client=config.max_connections_per_client,
            header_timeout=config.header_timeout,
            min_body_rate=config.min_body_rate,
            min_body_rate_window=config.min_body_rate_window,
            uncapped=frozenset(
                filter(None, [client_key(p) for p in explicit_proxies(config.trusted_proxy)])
            ),
        ),
    )


def create_app(
    config: Config | None = None,
    *,
    hook: Callable[[str, dict[str, Any]], None] | None = None,
    **overrides: Any,
) -> UploadApp:
    """`start_app`, with the waitress adjustments installed process-wide: for `waitress-serve`,
    whose server is not ours to configure. `overrides` are settings when `config` is None."""
    config = config if config is not None else Config.load(**overrides)
    app = start_app(config, hook=hook)
    waitress_server.install(app.server_policy)
    if app.metrics_app is not None:
        log.warning(
            "--metrics-listen / UPLOAD_SERVER_METRICS_LISTEN cannot open a listener under "
            "waitress-serve (the server is not ours): /metrics is served nowhere. Serve with "
            "upload-server, or drop it and protect /metrics with UPLOAD_SERVER_METRICS_AUTH"
        )
    return app
