"""Control: pause, resume, terminate and expire, read from a session's control queue.

The front end never changes a live session; it puts a command on the session's queue and a
`Nudge` in the writer's inbox, so the writer reads the queue at its next chunk boundary, in order
with the work queued before it. The session rules (`lifecycle.check_command`) are asked here, by
the authority: a command may have changed the record since the front end looked.
"""

from __future__ import annotations

import contextlib
import logging
from queue import Empty

from upload_server.sessions import lifecycle
from upload_server.sessions.lifecycle import Refusal
from upload_server.sessions.record import Session

from .append import discard_segment
from .context import Context, Interrupted
from .finish import discard_data
from .held import STATE, Held
from .messages import Append, Command, Nudge

log = logging.getLogger("upload_server.writer")


def read_controls(ctx: Context, nudge: Nudge) -> None:
    """Apply every command waiting on the session's queue; each requester gets an answer."""
    while True:
        try:
            command: Command = nudge.queue.get_nowait()
        except Empty:
            return
        except (EOFError, OSError, BrokenPipeError):
            log.error(
                "writer %d: control queue of %s unreachable",
                ctx.settings.index,
                nudge.session_id,
            )
            return
        try:
            held = ctx.sessions.hold(nudge.session_id)
            session = _apply(ctx, held, command)
        except Refusal as exc:
            ctx.refuse(command.request_id, nudge.session_id, exc)
        else:
            ctx.reply(command.request_id, session)


def _apply(ctx: Context, held: Held, command: Command) -> Session:
    """Carry out a control command, if the session rules allow it now."""
    session = held.session
    action = command.action
    completed_too = bool(command.args.get("completed_too"))
    lifecycle.check_command(session, action, completed_too=completed_too)
    if action == lifecycle.PAUSE:
        _interrupt(ctx, session.id, lifecycle.PAUSED, "the upload was paused")
        lifecycle.pause(session)
        held.checkpoint(STATE)
    elif action == lifecycle.RESUME:
        if lifecycle.resume(session):
            ctx.scheduler.start_drain(session.id)
        held.checkpoint(STATE)
    else:
        ended = lifecycle.ENDED_BY[action]
        _interrupt(ctx, session.id, ended, f"the upload was {ended}")
        lifecycle.end(session, action)
        discard_data(ctx, held)
        ctx.remove_spool(session.id)
        if session.location and completed_too:
            ctx.storage.remove(session.location)
        held.checkpoint(STATE)
        ctx.outbox.emit(session.state, session)
        held.release()
    return session


def _interrupt(ctx: Context, session_id: str, code: str, message: str) -> None:
    """Stop every task of the session at this chunk boundary; each requester gets an answer."""
    scheduler = ctx.scheduler
    for task in scheduler.tasks_of(session_id):
        scheduler.remove(task)
        if not task.started:
            task.steps.close()  # never started: answer for it
            if isinstance(task.message, Append):
                discard_segment(task.message)
            ctx.refuse(task.request_id, session_id, Interrupted(code, message))
            continue
        with contextlib.suppress(StopIteration, Interrupted):
            task.steps.throw(Interrupted(code, message))
        task.steps.close()
