"""upload_server: a resumable file upload server (the seed API and tus 1.0) on Falcon and waitress.

`create_app` builds the WSGI app; `upload-server` (see `cli`) serves it with tuned waitress settings.
The app is imported on first use, not with the package: a writer process started with `spawn`
imports this package for its helpers and must not pull the web app (and a circular import) in.
"""

from typing import Any

__all__ = ["create_app"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'upload_server' has no attribute {name!r}")
