"""waitress's I/O loop on a persistent `selectors` selector (epoll on Linux), counting its passes.

`wasyncore.poll2` builds a new `select.poll()` of every connection on every pass and asks each
one `readable()`/`writable()` first, so a pass costs time in proportion to the open connections:
1,000 idle connections cut one fast upload's intake to a fifth. Here each connection is registered
once, and its interest is looked at again only when something may have changed it:

- after it had an event (it read, wrote or closed),
- after the trigger fired (a request thread queued output or finished a task) or a listener
  accepted connections: then every connection is looked at once (one cheap pass),
- at least once a second (`TICK`), when `on_tick` also runs (the deadline checks).

Within a pass, connections in the middle of a watched request body (a tus PATCH) come after the
others, and at most `BODY_READS` of them are read (longest unserved first; the rest stay ready for
the next pass): a HEAD or status request waits for a few 256 KiB body reads, not for one of every
busy upload. While a bodiless HEAD or GET is queued or running, body reads wait for it (one
`QUICK_WINDOW` at most, napping between passes), so that its request thread finds the GIL and a
core. A HEAD's wait for cut connections (`catch_up`) looks at the sockets themselves (`poll`,
and a peek at a connection between requests) instead of waiting whole passes, and waits for a
connection the I/O thread is handling only until that event is done.

Listening sockets are asked every pass, as before: their `readable()` runs waitress's maintenance
and its connection limit. Events are handed to `wasyncore.readwrite`, so channels see the same
`handle_read_event` / `handle_write_event` / `handle_close` / `handle_error` calls as before.
Where only `select` exists (Windows), `DefaultSelector` is a `SelectSelector`: the same code, with
that call's socket limit (see `connection_limits`).
"""

from __future__ import annotations

import contextlib
import logging
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import waitress.trigger
import waitress.wasyncore

from . import portable

log = logging.getLogger("upload_server.waitress")

TICK = 1.0  # seconds: the longest wait for an event, and the period of `on_tick`
POLLIN = getattr(select, "POLLIN", 1)
POLLOUT = getattr(select, "POLLOUT", 4)
BODY_READS = 2  # body reads (recv_bytes each) per pass at most, so that others wait less
QUICK_WINDOW = 0.005  # seconds at most that body reads wait for queued bodiless requests
QUICK_NAP = 0.0005  # seconds between passes while they wait
_QUICK = ("HEAD", "GET")  # the requests they wait for, when they have no body

_Event = tuple[selectors.SelectorKey, int]


def _interest(obj: Any) -> int:
    events = 0
    if obj.readable():
        events |= selectors.EVENT_READ
    if obj.writable() and not obj.accepting:
        events |= selectors.EVENT_WRITE
    return events


class _Registrations:
    """What the selector watches for each dispatcher of one socket map."""

    def __init__(self, selector: selectors.BaseSelector, socket_map: dict[int, Any]) -> None:
        self.selector = selector
        self.map = socket_map
        self.known: dict[int, tuple[Any, int]] = {}  # fd -> (dispatcher, events registered)
        self.listeners: list[tuple[int, Any]] = []

    def update(self, fd: int, obj: Any) -> None:
        if self.map.get(fd) is not obj:  # closed (its fd may already be someone else's)
            self.forget(fd, obj)
            return
        events = _interest(obj)
        old = self.known.get(fd)
        if old is not None and old[0] is obj and old[1] == events:
            return
        if old is not None and old[1]:
            if old[0] is obj and events:
                try:
                    self.selector.modify(fd, events, obj)
                    self.known[fd] = (obj, events)
                    return
                except (OSError, ValueError, KeyError):
                    pass
            self._unregister(fd)
        if events:
            try:
                self.selector.register(fd, events, obj)
            except (OSError, ValueError, KeyError):
                self._unregister(fd)
                self.selector.register(fd, events, obj)
        self.known[fd] = (obj, events)

    def forget(self, fd: int, obj: Any = None) -> None:
        old = self.known.get(fd)
        if old is None or (obj is not None and old[0] is not obj):
            return
        del self.known[fd]
        if old[1]:
            self._unregister(fd)

    def _unregister(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.selector.unregister(fd)

    def rescan(self) -> None:
        """Look at every dispatcher once: new ones are registered, gone ones dropped."""
        items = list(self.map.items())
        for fd, obj in items:
            self.update(fd, obj)
        for fd in [fd for fd in self.known if fd not in self.map]:
            self.forget(fd)
        self.listeners = [(fd, obj) for fd, obj in items if obj.accepting]

    def close(self) -> None:
        self.selector.close()


class SelectorLoop:
    """Stands in for the `wasyncore` module in waitress's servers (they call `asyncore.loop` and
    `asyncore.dispatcher`): the loop described above, counting its passes for `settle`."""

    dispatcher = waitress.wasyncore.dispatcher
    selector_class: Callable[[], selectors.BaseSelector] = selectors.DefaultSelector

    def __init__(self) -> None:
        self._passes = 0
        self._changed = threading.Condition()
        self._wake: Callable[[], None] = lambda: None
        self.on_tick: Callable[[float], None] = lambda now: None
        self._active: _Registrations | None = None
        self._served: dict[int, int] = {}  # fd -> the pass that last read its body (`_ration`)
        self._taken = 0  # events handled on connections that may hold a cut (`catch_up`)
        self._taking: Any = None  # such a connection while its event is being handled
        self._quick = 0  # bodiless requests (HEAD, GET) queued or running (`quick_begun`)
        self._quick_until = 0.0  # body reads wait for them until then at most
        self._quick_lock = threading.Lock()
        self._napping = False  # this pass left body reads for later (`_ration`)

    def loop(
        self,
        timeout: float = 30.0,
        use_poll: bool = False,
        map: dict[int, Any] | None = None,
        count: int | None = None,
    ) -> None:
        socket_map = waitress.wasyncore.socket_map if map is None else map
        for obj in socket_map.values():
            if isinstance(obj, waitress.trigger.trigger):
                self._wake = obj.pull_trigger
        selector = selectors.SelectSelector() if portable.active() else self.selector_class()
        registrations = _Registrations(selector, socket_map)
        self._active = registrations
        try:
            self._run(registrations, timeout, count)
        finally:
            self._active = None
            registrations.close()

    def closing(self, fd: int | None, obj: Any) -> None:
        """A dispatcher is about to close its socket: stop watching it first. (epoll watches the
        socket itself, not its number: a socket that a forked process still holds stays watched
        after it is closed here, and its events would come under a number that may by then be
        another connection's.)"""
        registrations = self._active
        if registrations is not None and fd is not None:
            registrations.forget(fd, obj)

    def _run(self, reg: _Registrations, timeout: float, count: int | None) -> None:
        socket_map = reg.map
        rescan = True
        touched: list[tuple[int, Any]] = []
        next_tick = time.monotonic()
        while socket_map and (count is None or count > 0):
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK
                self._tick()
                rescan = True
            if rescan or len(reg.known) != len(socket_map):
                reg.rescan()
            else:
                for fd, obj in touched:
                    reg.update(fd, obj)
                for fd, obj in reg.listeners:
                    reg.update(fd, obj)
            rescan = False
            touched = []
            wait = max(0.0, min(timeout, next_tick - time.monotonic()))
            if not reg.selector.get_map():
                time.sleep(wait)
                events: list[_Event] = []
            else:
                try:
                    events = reg.selector.select(wait)
                except InterruptedError:
                    events = []
            events = self._ration(events)
            for key, mask in events:
                obj, fd = key.data, key.fd
                if socket_map.get(fd) is not obj:
                    continue
                mask &= reg.known.get(fd, (None, 0))[1]
                flags = (POLLIN if mask & selectors.EVENT_READ else 0) | (
                    POLLOUT if mask & selectors.EVENT_WRITE else 0
                )
                if flags and _excused(obj):
                    waitress.wasyncore.readwrite(obj, flags)
                elif flags:
                    self._taking = obj
                    try:
                        waitress.wasyncore.readwrite(obj, flags)
                    finally:
                        self._taking = None
                        self._taken += 1
                touched.append((fd, obj))
                if obj.accepting or isinstance(obj, waitress.trigger.trigger):
                    rescan = True  # new connections, or a request thread changed some
            with self._changed:
                self._passes += 1
                self._changed.notify_all()
            if self._napping:  # the bodies are still ready: do not spin on them
                self._napping = False
                time.sleep(QUICK_NAP)
            if count is not None:
                count -= 1

    def _tick(self) -> None:
        try:
            self.on_tick(time.time())
        except Exception:  # the deadline checks must never stop the loop
            log.exception("the I/O loop's periodic check failed")

    def settle(self, passes: int, timeout: float) -> None:
        """Wait (from a request thread) until the I/O thread has made `passes` more passes, each
        reading every socket that has data (of those in a watched body, `BODY_READS`): what
        reached this host before now has been seen.
        Bounded by `timeout`; returns at once when no loop runs (another WSGI server)."""
        with self._changed:
            if not self._passes:
                return
            target = self._passes + passes
        deadline = time.monotonic() + timeout
        while True:
            self._wake()
            with self._changed:
                left = deadline - time.monotonic()
                if self._passes >= target or left <= 0:
                    return
                self._changed.wait(min(left, 0.005))

    def _ration(self, events: list[_Event]) -> list[_Event]:
        """This pass's events: every one of a connection not in a body first (a HEAD or status
        waits for no body chunk), then at most `BODY_READS` of those in a body, the ones
        served longest ago first. The rest stay ready for the next pass, which then comes
        after a few chunks rather than after every busy upload's."""
        quick = [event for event in events if not _in_body(event[0].data)]
        if len(quick) == len(events):
            return events
        if self._yielding():
            self._napping = True
            return quick
        bodies = [event for event in events if _in_body(event[0].data)]
        served = self._served
        if len(bodies) > BODY_READS:
            bodies.sort(key=lambda event: served.get(event[0].fd, -1))
            del bodies[BODY_READS:]
        if len(served) > 4096:  # numbers of closed connections
            served.clear()
        for key, _ in bodies:
            served[key.fd] = self._passes
        return quick + bodies

    def quick_begun(self, request: Any) -> bool:
        """(I/O thread) `request` is complete and queued: if it is a bodiless HEAD or GET (True),
        body reads wait until it is answered (`quick_done`), so that its request thread finds
        the GIL and a core free rather than behind 256 KiB reads and writes. At most
        `QUICK_WINDOW` from the first of those waiting, then at least one pass reads bodies: a
        flood of HEADs (or one waiting for a body still arriving) cannot stop the bodies."""
        command = getattr(request, "command", None)  # none for a stray blank line
        if request.error is not None or command not in _QUICK or request.content_length:
            return False
        with self._quick_lock:
            if not self._quick:
                self._quick_until = time.monotonic() + QUICK_WINDOW
            self._quick += 1
        return True

    def quick_done(self, request: Any) -> None:
        """(a request thread) `request` was answered: if `quick_begun` counted it, body reads
        no longer wait for it."""
        if getattr(request, "quick", False):
            with self._quick_lock:
                self._quick = max(0, self._quick - 1)

    def _yielding(self) -> bool:
        if not self._quick:
            return False
        if time.monotonic() < self._quick_until:
            return True
        with self._quick_lock:
            self._quick = 0  # past the window: what was not told done no longer counts
        return False

    def catch_up(self, timeout: float, passes: int, about: bytes) -> None:
        """Wait (from a request thread) until what reached this host before now about `about`
        (an upload id) has been taken in: no waiting connection is left to accept and no socket
        the loop reads has unread bytes or an unseen close, leaving out connections in the
        middle of a watched body (their cut is waited for through the body observer,
        `cut_bodies`) and those between requests whose unread bytes (peeked) do not name
        `about`. Under load those are the busy ones, so this usually returns at once, where
        `settle` waits whole passes of every busy socket. Unread bytes wait for the next pass;
        a connection the I/O thread is handling only for that one event (`BUSY_WAIT` at a time:
        a pass may hold a few body reads). Bounded by `timeout`; without `select.poll` it is
        `settle(passes, ...)`."""
        if not hasattr(select, "poll"):
            self.settle(passes, timeout)
            return
        deadline = time.monotonic() + timeout
        while (unread := self._unread(about)) is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if unread is _BUSY:
                time.sleep(min(left, BUSY_WAIT))
            else:
                self.settle(1, left)

    def _unread(self, about: bytes) -> object | None:
        """What `catch_up` waits for: None (nothing), `_BUSY` (the I/O thread is handling, or
        handled meanwhile, a connection that may hold bytes about `about`), `_PENDING` (a
        socket has bytes the loop has not read)."""
        registrations = self._active
        if registrations is None:
            return None
        taken = self._taken
        if self._taking is not None:
            return _BUSY
        poller = select.poll()
        watched = {}
        for fd, obj in list(registrations.map.items()):
            known = registrations.known.get(fd)
            if _excused(obj) or (known is not None and not known[1] & selectors.EVENT_READ):
                continue  # not read by the loop now: waiting would not change it
            with contextlib.suppress(OSError, ValueError):
                poller.register(fd, _UNREAD)
                watched[fd] = obj
        for fd, mask in poller.poll(0):
            if mask & _UNREAD and not _elsewhere(watched.get(fd), about):
                return _PENDING
        # a connection handled meanwhile may have taken bytes the poll no longer shows
        return _BUSY if self._taking is not None or self._taken != taken else None


_BUSY, _PENDING = object(), object()
BUSY_WAIT = 0.0005  # seconds between looks while the I/O thread handles one connection's event
_UNREAD = POLLIN | getattr(select, "POLLHUP", 16) | getattr(select, "POLLERR", 8)


def _excused(obj: Any) -> bool:
    """The trigger, or a connection in the middle of a watched body: neither can hold a cut that
    `catch_up` must wait for."""
    return isinstance(obj, waitress.trigger.trigger) or _in_body(obj)


def _in_body(obj: Any) -> bool:
    """A connection in the middle of a body the observer watches (waitress adjustments: its
    parser's `watch_key`, set from the headers until the body is complete or cut)."""
    request = getattr(obj, "request", None)
    return getattr(request, "watch_key", None) is not None


def _elsewhere(obj: Any, about: bytes) -> bool:
    """A connection between requests whose unread bytes (peeked, not taken) do not name `about`:
    a close there drops no request of it, and its next request is not about it. (A request
    partly read is judged by the loop, not here.)"""
    if obj is None or getattr(obj, "request", True) is not None or obj.accepting:
        return False
    try:
        peeked = obj.socket.recv(_PEEK, _PEEK_FLAGS)
    except (OSError, ValueError, AttributeError):
        return False
    return about not in peeked


_PEEK = 8192  # a request line and its headers
_PEEK_FLAGS = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)


LOOP = SelectorLoop()
