"""Flushes that overlap: a writer runs the I/O of its uploads' completions on a few threads.

A writer is one thread that round-robins its sessions' tasks, so the fsyncs that end an upload
(its data, the publishing note and its directory, the upload directory, the completed record and
its directory) would stall every other session on that writer, and 32 uploads completing at once
would pay their flush latencies one after another. Here a completing task hands that I/O to a
small pool and yields until it is done; meanwhile the writer steps its other tasks, whose own
completions join the pool, so the filesystem's journal commits their flushes together. The task
answers its requester only after its own I/O has returned: "durable" keeps meaning its own file
and record are on disk.

The pool is per process, made on first use (a writer is forked: threads do not survive a fork).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Generator
from concurrent import futures
from typing import TypeVar

THREADS = 8  # completions in flight per writer
IDLE_WAIT = 0.002  # seconds a waiting task blocks when no task of the writer has other work

T = TypeVar("T")

_lock = threading.Lock()
_pool: futures.ThreadPoolExecutor | None = None
_pool_pid = 0
_pending: set[futures.Future[object]] = set()


def _executor() -> futures.ThreadPoolExecutor:
    global _pool, _pool_pid
    with _lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = futures.ThreadPoolExecutor(THREADS, thread_name_prefix="flush")
            _pool_pid = os.getpid()
            _pending.clear()
        return _pool


def waiting() -> int:
    """Completions in flight in this process (each one's task is waiting for it)."""
    return len(_pending)


def wait_all() -> None:
    """Let every completion in flight end (before the writer saves what it holds and exits)."""
    futures.wait(set(_pending))


def run(work: Callable[[], T], others_busy: Callable[[], bool]) -> Generator[int, None, T]:
    """Run `work` on a flusher thread and yield 0 until it has returned; return what it
    returned, raise what it raised.

    When none of the writer's other tasks has anything to do (`others_busy()` is false) the task
    blocks a few milliseconds for any flush to end, rather than let the loop spin. Anything
    thrown in meanwhile (a command's `Interrupted`, the generator closed) is re-raised only once
    `work` has ended, so that nothing touches the session or its file under it."""
    future = _executor().submit(work)
    _pending.add(future)
    try:
        while not future.done():
            yield 0
            if not future.done() and not others_busy():
                futures.wait(set(_pending), IDLE_WAIT, futures.FIRST_COMPLETED)
    except BaseException:
        futures.wait([future])
        raise
    finally:
        _pending.discard(future)
    return future.result()
