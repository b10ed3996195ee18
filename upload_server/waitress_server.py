"""Serving the app with waitress, with the adjustments of `waitress_patches` for one server or
process-wide.

`create_server` (what `upload-server` serves with) makes a server whose classes carry them: its
listeners (`UploadServer`: our loop as its `asyncore`, our accept and connection limit), their
channels (`channel_for`: our parser, task and error task classes, bound to one `ServerPolicy`), all
through waitress's own extension points (`channel_class`, `parser_class`, `task_class`,
`error_task_class`, the server's `asyncore`). Nothing of waitress changes for anyone else. Under
`waitress-serve --call upload_server:create_app` waitress creates the server, so `install` (called
by `create_app`) sets the same classes on waitress's own server class instead, process-wide, and
gives every waitress error the JSON body there too. (Only difference: on our server, the 400 of
waitress's proxy-headers middleware, a trusted proxy's malformed `Forwarded` header, keeps
waitress's plain-text body: that middleware answers outside any channel.)

Process-wide either way: the event loop (`event_loop.LOOP`) and the connection admission
(`connection_limits.ADMISSION`). A process has one I/O thread, and request threads reach its loop
without knowing any server (`LOOP.settle`, from `cut_bodies`); the connection limit is the
process's, derived from its open-file limit, and so is the memory budget for request bodies.
"""

from __future__ import annotations

from typing import Any

import waitress.adjustments
import waitress.server
import waitress.task
import waitress.utilities

from .connection_limits import (
    ADMISSION,
    Limits,
    accept_waiting,
    accepting,
    effective_max_connections,
)
from .event_loop import LOOP
from .waitress_patches import JsonError, KeepingChannel, ServerPolicy


def channel_for(policy: ServerPolicy) -> type[KeepingChannel]:
    """Our channel class bound to `policy`: waitress makes each connection's channel from its
    server's `channel_class`, so that is where one server's policy goes."""
    return type("KeepingChannel", (KeepingChannel,), {"policy": policy})


class UploadServer(waitress.server.TcpWSGIServer):
    """A TCP listener on our loop, accepting as `connection_limits` says, with `channel_class`."""

    asyncore = LOOP
    handle_accept = accept_waiting
    readable = accepting

    def __init__(self, application: Any, *, channel_class: type[KeepingChannel], **kw: Any) -> None:
        self.channel_class = channel_class
        super().__init__(application, **kw)


class UploadMultiSocketServer(waitress.server.MultiSocketServer):
    """Several listeners (a host name with IPv4 and IPv6 addresses) run by our loop."""

    asyncore = LOOP


def create_server(
    application: Any, policy: ServerPolicy, **options: Any
) -> UploadServer | UploadMultiSocketServer:
    """`waitress.create_server` for TCP listeners (`options` are waitress's, as there), with
    `policy` applied to this server's connections only."""
    _admit(policy.limits)
    adj = waitress.adjustments.Adjustments(**options)
    socket_map: dict[int, Any] = {}
    dispatcher = waitress.task.ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    channel_class = channel_for(policy)
    servers = [
        UploadServer(
            application,
            map=socket_map,
            dispatcher=dispatcher,
            adj=adj,
            sockinfo=sockinfo,
            channel_class=channel_class,
        )
        for sockinfo in adj.listen
    ]
    if len(servers) == 1:
        return servers[0]
    listening = [(server.effective_host, server.effective_port) for server in servers]
    return UploadMultiSocketServer(socket_map, adj, listening, dispatcher, servers[0].log_info)


def install(policy: ServerPolicy) -> int:
    """Apply `policy` to every waitress server of this process, by setting our classes on
    waitress's own (for `waitress-serve`, which creates the server itself). Returns the
    connection limit in force (lowered to the open-file limit)."""
    max_connections = _admit(policy.limits)
    server = waitress.server.BaseWSGIServer
    server.asyncore = LOOP
    server.handle_accept = accept_waiting
    server.readable = accepting
    server.channel_class = channel_for(policy)
    waitress.server.MultiSocketServer.asyncore = LOOP
    waitress.utilities.Error.to_response = JsonError.to_response  # as before, for every answer
    return max_connections


def _admit(limits: Limits) -> int:
    """Set the process's connection limits (see the module's docstring: they are the process's)
    and have the loop's tick enforce their deadlines; the connection limit in force."""
    max_connections = effective_max_connections(limits.max_connections)
    ADMISSION.configure(limits, max_connections)
    LOOP.on_tick = ADMISSION.check
    return max_connections
