"""The upload page at `--web-path` (default `/`), served by the server itself.

The page is plain files in the package (`upload_server/web/`), with tus-js-client vendored next to
them, so it needs no build step and no CDN: it works on a network with no way out. Only index.html
is filled in, once at start-up, with the tus endpoint and a digest of the assets, so that browsers
fetch them again when they change.
"""

from __future__ import annotations

import hashlib
import html
from pathlib import Path

import falcon

from ..config import Config

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

# Everything the page loads and calls is on its own origin; nothing inline, nothing framed.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


class PageResource:
    """GET the page: index.html with this server's tus endpoint filled in."""

    def __init__(self, tus_path: str) -> None:
        template = (WEB_DIR / "index.html").read_text(encoding="utf-8")
        page = template.replace("__TUS_PATH__", html.escape(tus_path, quote=True))
        self.body = page.replace("__ASSETS_DIGEST__", _assets_digest()).encode()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.cache_control = ["no-cache"]
        resp.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Referrer-Policy", "no-referrer")
        resp.data = self.body


def _assets_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted((WEB_DIR / "assets").rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(WEB_DIR).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


class SlashRedirect:
    """`/ui` sends the browser to `/ui/`, so that the page's relative asset links resolve."""

    def __init__(self, location: str) -> None:
        self.location = location

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        raise falcon.HTTPMovedPermanently(self.location)


def add_routes(app: falcon.App, config: Config) -> None:
    """The page at `web_path` and its assets (CSS, JS, tus-js-client) under `web_path/assets/`."""
    path = config.web_path
    app.add_route(path, PageResource(config.tus_path))
    if path != "/":
        app.add_route(path.rstrip("/"), SlashRedirect(path))
    app.add_static_route(path + "assets", str(WEB_DIR / "assets"))
