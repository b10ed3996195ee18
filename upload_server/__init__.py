"""upload_server: a resumable file upload server (the seed API and tus 1.0) on Falcon and waitress.

`create_app` builds the WSGI app; `upload-server` (see `cli`) serves it with tuned waitress settings.
"""

from .app import create_app

__all__ = ["create_app"]
__version__ = "0.1.0"
