"""What every helper process (the Manager, each writer) does first."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import sys

from . import portable


def become_child() -> None:
    """Die with the parent, and leave Ctrl-C and SIGTERM to it.

    Ctrl-C reaches the whole foreground process group, and a supervisor may send SIGTERM to the whole
    group (systemd's default `KillMode=control-group`); the front end decides when writers and the
    Manager stop (writers after they checkpoint; either is killed if it does not stop in time), so
    children ignore both. Were the Manager to die of that SIGTERM, the front end would first take it
    for a crash and start replacing it. On Linux the kernel kills a child whose parent dies,
    so a `kill -9` of the server leaves no orphan holding files or the listening socket. The kernel
    means the parent *thread*: start children only from threads that live as long as the server.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    close_network_sockets()
    if not sys.platform.startswith("linux") or portable.active():
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(1)  # the parent died before the signal was armed


def close_network_sockets() -> None:
    """Close the TCP sockets a forked child inherited from the running server (the listening
    socket and its clients' connections). A writer or Manager started after the server listens (a
    replacement) would otherwise hold a copy of every open connection, so a connection the server
    closed would stay half-open for its client until that child exits. Pipes and Unix sockets,
    which the child talks to the server over, are kept. Only where /proc lists a process's files."""
    if not os.path.isdir("/proc/self/fd"):
        return
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        family = sock.family
        sock.detach()
        if family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                os.close(fd)
