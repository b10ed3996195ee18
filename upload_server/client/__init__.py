"""`upload-client`: upload files and folders to an upload_server over tus, and manage its sessions.

`command` parses the command line; `transfer` moves one file (tuspy underneath), `state` remembers
unfinished uploads between runs, `api` speaks to the server's seed API, `download` fetches a
finished upload and `progress` draws the bars.
"""

from __future__ import annotations

import sys


def main() -> int:
    """The `upload-client` entry point: a clear message when the `client` extra is missing."""
    try:
        from .command import main as run
    except ImportError as exc:
        print(
            f"upload-client: {exc.name or exc} is missing; install the client with "
            "pip install 'upload_server[client]'",
            file=sys.stderr,
        )
        return 2
    return run()
