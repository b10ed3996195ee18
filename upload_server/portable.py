"""`--portable` (`UPLOAD_SERVER_PORTABLE=1`): take, on Linux, the paths another OS would take.

The server uses Linux-only fast paths where it can and falls back where they do not exist (Windows,
macOS). No Windows machine runs the tests, so this switch turns every fast path off at once, and CI
runs a pass of the tests with it, to keep the fall-backs working:

| fast path (Linux) | fall-back (portable, and Windows) |
|---|---|
| `O_TMPFILE` body buffers, named by `linkat` into the spool | an ordinary temporary file, copied |
| `copy_file_range` | mmap windows + writes |
| `os.pwrite` / `os.pread` / `os.preadv` | seek + write / mmap reads |
| `sync_file_range` (early writeback) | none |
| `PR_SET_PDEATHSIG` (children die with the front end) | none (the Manager outlives a kill -9) |
| directory `fsync` after a rename | none (Windows cannot open a directory) |
| `fork` start method | `spawn` (unless `--start-method` says otherwise) |
| epoll in the server's loop | `select` |

Not covered: the upload directory's lock stays `fcntl.flock` (Windows takes `msvcrt.locking`, which
cannot run here), and Windows' own socket limits (`select` takes at most 512 sockets there) and
file semantics (an open file cannot be renamed or deleted) are not reproduced.

The switch is read from the environment, so that every process (Manager and writers, also under
`spawn`) sees it; `configure` sets the environment for a `--portable` given as a flag.
"""

from __future__ import annotations

import os

ENV = "UPLOAD_SERVER_PORTABLE"


def _from_environment() -> bool:
    return os.environ.get(ENV, "").strip().lower() in {"1", "true", "yes", "on"}


ACTIVE = _from_environment()


def active() -> bool:
    """True when the Linux-only fast paths are off."""
    return ACTIVE


def configure(on: bool) -> None:
    """Set portable mode for this process and every process it starts from now on (the setting
    `portable`, whose flag wins over the environment like every setting's)."""
    global ACTIVE
    ACTIVE = on
    if on != _from_environment():
        os.environ[ENV] = "1" if on else "0"
