"""Cross-cutting HTTP behaviour: method override, tus version headers, CORS.

Each is a small Falcon middleware so resources stay free of it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid

import falcon

from .. import errors, logs, metrics
from ..auth import Authenticator
from ..clients import client_key
from ..protocol import draft, tus

_OVERRIDABLE = {"PATCH", "DELETE", "HEAD", "GET", "OPTIONS", "PUT"}

EXPOSED_HEADERS = ", ".join(
    (
        "Location",
        "Upload-Offset",
        "Upload-Length",
        "Upload-Defer-Length",
        "Upload-Expires",
        "Upload-Metadata",
        "Upload-Concat",
        "Tus-Resumable",
        "Tus-Version",
        "Tus-Max-Size",
        "Tus-Extension",
        "Tus-Checksum-Algorithm",
        "Repr-Digest",
        "Upload-Complete",
        "Upload-Incomplete",
        "Upload-Limit",
        "Upload-Draft-Interop-Version",
        "Retry-After",
        "WWW-Authenticate",
        "Content-Disposition",
        "Content-Range",
        "Content-Length",
        "X-Request-ID",
    )
)
ALLOWED_HEADERS = ", ".join(
    (
        "Authorization",
        "Content-Type",
        "Origin",
        "X-Requested-With",
        "X-Request-ID",
        "X-HTTP-Method-Override",
        "Tus-Resumable",
        "Upload-Length",
        "Upload-Offset",
        "Upload-Metadata",
        "Upload-Defer-Length",
        "Upload-Concat",
        "Upload-Checksum",
        "Repr-Digest",
        "Want-Repr-Digest",
        "Content-Digest",
        "Content-Disposition",
        "Upload-Complete",
        "Upload-Incomplete",
        "Upload-Draft-Interop-Version",
        "Range",
    )
)
ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")  # an HTTP header name
access_log = logging.getLogger("upload_server.access")


class RequestLog:
    """A request id on every request (the client's X-Request-ID when sane), echoed in the
    response and on every log line written meanwhile; one access log line and one latency
    observation per request."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        given = req.get_header("X-Request-ID") or ""
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        req.context.request_id = rid
        req.context.log_token = logs.request_id.set(rid)
        req.context.started = time.perf_counter()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, succeeded: bool
    ) -> None:
        rid = req.context.get("request_id")
        if rid is None:
            return
        resp.set_header("X-Request-ID", rid)
        duration = time.perf_counter() - req.context.started
        status = resp.status_code
        route = req.uri_template or "unmatched"
        metrics.get().request_duration.labels(req.method, route, str(status)).observe(duration)
        access_log.info(
            "%s %s %s",
            req.method,
            req.path,
            status,
            extra={
                "method": req.method,
                "path": req.path,
                "status": status,
                "duration_ms": round(duration * 1000, 2),
                "bytes": req.content_length or 0,
                "client": req.remote_addr,
            },
        )
        logs.request_id.reset(req.context.log_token)


class MethodOverride:
    """`X-HTTP-Method-Override`, for clients and proxies that cannot send PATCH: honoured on
    every method, as tus 1.0 says it MUST be when present.

    On the wire the request keeps its method, so its answer must be framed as one: for an override
    to HEAD, Falcon would drop the body but still announce its length (waitress then closes the
    connection short of it, and the client reads a truncated answer), and a HEAD overridden to GET
    must not get a body. So once the app has answered, the request has its own method again for
    Falcon."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        override = (req.get_header("X-HTTP-Method-Override") or "").strip().upper()
        if override and override != req.method and override in _OVERRIDABLE | {"POST"}:
            req.context.sent_method = req.method
            req.method = override

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, succeeded: bool
    ) -> None:
        sent = req.context.get("sent_method")
        if sent:
            req.method = sent


class TusVersion:
    """Every tus response says `Tus-Resumable`; every tus request but OPTIONS (and a GET download
    that sends no version) must send `Tus-Resumable: 1.0.0`, or gets 412 with the versions this
    server speaks."""

    def __init__(self, tus_path: str) -> None:
        self.prefix = tus_path.rstrip("/")

    def _is_tus(self, req: falcon.Request) -> bool:
        return req.path == self.prefix or req.path.startswith(self.prefix + "/")

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self._is_tus(req) or req.method == "OPTIONS" or draft.speaks_draft(req.get_header):
            return
        version = req.get_header("Tus-Resumable")
        if version is None and req.method == "GET":
            return  # a download link followed by a browser
        if version != tus.VERSION:
            raise errors.UploadError(
                f"this server speaks tus {tus.VERSION}; send Tus-Resumable: {tus.VERSION}",
                code="unsupported_version",
                status=412,
                headers={"Tus-Version": tus.VERSION},
            )

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, succeeded: bool
    ) -> None:
        if self._is_tus(req) and not draft.speaks_draft(req.get_header):
            resp.set_header("Tus-Resumable", tus.VERSION)


class Cors:
    """CORS for browsers on other origins: preflights answered before anything else runs
    (authentication included), and the tus headers a client must read exposed."""

    def __init__(self, origins: tuple[str, ...], tus_path: str) -> None:
        self.any = "*" in origins
        self.origins = set(origins)
        self.tus_prefix = tus_path.rstrip("/")

    def allow_origin(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin for a request from `origin`, or None."""
        if not origin or not (self.any or origin in self.origins):
            return None
        return "*" if self.any else origin

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        preflight = req.method == "OPTIONS" and req.get_header("Access-Control-Request-Method")
        if not preflight or not self.allow_origin(req.get_header("Origin")):
            return
        requested = req.get_header("Access-Control-Request-Headers") or ""
        extra = [h.strip() for h in requested.split(",") if _TOKEN.match(h.strip())]
        resp.set_header("Access-Control-Allow-Methods", ALLOWED_METHODS)
        resp.set_header("Access-Control-Allow-Headers", ", ".join([ALLOWED_HEADERS, *extra]))
        resp.set_header("Access-Control-Max-Age", "86400")
        if req.path != self.tus_prefix and not req.path.startswith(self.tus_prefix + "/"):
            resp.status = falcon.HTTP_204
            resp.complete = True  # elsewhere a preflight needs no resource; tus OPTIONS has its own

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, succeeded: bool
    ) -> None:
        allowed = self.allow_origin(req.get_header("Origin"))
        if allowed is None:
            return
        resp.set_header("Access-Control-Allow-Origin", allowed)
        resp.set_header("Access-Control-Expose-Headers", EXPOSED_HEADERS)
        if not self.any:
            resp.append_header("Vary", "Origin")


class Authenticate:
    """Puts the caller (`req.context.principal`) on every request to the upload APIs, or refuses
    it with 401. Health checks, the OpenAPI document, the web page and preflights stay public, and
    metrics unless an `operator` path (`/metrics` with `--metrics-auth`: an API key, with auth on
    or off); `principal` is None wherever authentication is off. A download (GET or HEAD under the
    tus path) may carry its credential as `?access_token=`: a browser cannot add headers to a link.
    Nothing else may, so credentials stay out of the URLs that proxies and logs keep.

    It also puts `req.context.client`, the client's address key (`clients.client_key` of
    `REMOTE_ADDR`, which waitress sets to the forwarded address behind a trusted proxy): with
    authentication off, the per-owner session limit counts per client. It is never an owner."""

    def __init__(
        self,
        authenticator: Authenticator,
        protected: tuple[str, ...],
        tus_path: str,
        operator: tuple[str, ...] = (),
    ) -> None:
        self.authenticator = authenticator
        self.protected = tuple(p.rstrip("/") for p in protected)
        self.downloads = tus_path.rstrip("/") + "/"
        self.operator = operator

    def _is_protected(self, path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in self.protected)

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.principal = None
        req.context.client = client_key(req.env.get("REMOTE_ADDR"))
        if req.path in self.operator:
            req.context.principal = self.authenticator.authenticate_key(
                req.get_header("Authorization")
            )
            return
        if req.method == "OPTIONS" or not self._is_protected(req.path):
            return
        download = req.method in ("GET", "HEAD") and req.path.startswith(self.downloads)
        query = req.get_param("access_token") if download else None
        req.context.principal = self.authenticator.authenticate(
            req.get_header("Authorization"), query
        )


class ForwardedClientShare:
    """Behind an explicit `--trusted-proxy` every connection comes from the proxy, so the
    per-client connection cap cannot tell clients apart (and does not count the proxy). This caps,
    at `--max-connections-per-client`, the requests in flight per forwarded client instead (the
    address waitress took from the proxy's headers): past it, 429 `too_many_connections`."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.share = None
        key = req.context.client
        if key is None:
            return
        with self._lock:
            count = self._in_flight.get(key, 0)
            if count >= self.cap:
                raise errors.UploadError(
                    f"at most {self.cap} requests at once per client",
                    code="too_many_connections",
                    status=429,
                    headers={"Retry-After": "1"},
                )
            self._in_flight[key] = count + 1
        req.context.share = key

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        key = getattr(req.context, "share", None)
        if key is None:
            return
        with self._lock:
            left = self._in_flight.get(key, 1) - 1
            if left > 0:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)
