"""A session's life, once: which state may take which command, and what each transition does.

    created ──> queued (seed) / waiting (tus) ──> writing <──> waiting ──> completed
                   │  ▲                              │
            pause  ▼  │ resume                       ▼
                  paused        failed (resumable)    terminated / expired (final)

Every protocol and every process asks these functions: the API as a fast pre-check (a request that
cannot succeed is refused before its body is spooled), the writer as the authority (it holds the
record, and a command may have changed it since the API looked), and restart recovery, which
completes an upload through the same `complete` a writer uses. A rule refuses with a `Refusal`, a
domain code and a message; `api/refusals.py` alone turns a code into an HTTP status for the protocol
the client speaks, so nothing here (or in `workers/`) knows HTTP.

Completion is a separate step from receiving the last byte (`is_whole`): a protocol that completes
only on the client's word (the IETF draft's `Upload-Complete: ?1`) can hold a whole upload open.
A draft upload's length enters the record only with the request that completes it (`draft_length`,
as a deferred tus length is declared): until then `is_whole` cannot be true, so an upload whose
bytes are all in (`awaits_completion`) waits, and the writer's usual completion (digest,
publishing, hooks) runs once the client says so.
"""

from __future__ import annotations

from . import record as states
from .record import Session

# Refusal codes: stable, machine-readable, shown to clients as `error.code`. A refusal because of a
# final state uses the state's own name ("completed", "terminated", "expired").
PAUSED = states.PAUSED
COMPLETED = states.COMPLETED
NOT_PAUSED = "not_paused"
OFFSET_MISMATCH = "offset_mismatch"
EXCEEDS_LENGTH = "exceeds_length"
UPLOAD_TOO_LARGE = "upload_too_large"
LENGTH_SET = "length_set"
LENGTH_TOO_SMALL = "bad_header"  # the code tus clients have always been given for it
SEED_SESSION = "seed_session"
FINAL_UPLOAD = "final_upload"
UNKNOWN_COMMAND = "bad_command"
INCONSISTENT_LENGTH = "inconsistent_length"
STATE_LOST = "state_lost"

# Commands (the control queue's actions, plus what the writer does to a session on its own).
PAUSE, RESUME, TERMINATE, EXPIRE = "pause", "resume", "terminate", "expire"
COMMANDS = (PAUSE, RESUME, TERMINATE, EXPIRE)
ENDED = frozenset({states.TERMINATED, states.EXPIRED})
ENDED_BY = {TERMINATE: states.TERMINATED, EXPIRE: states.EXPIRED}


class Refusal(Exception):
    """A command this session may not take now, or work that did not succeed. `offset` is the
    upload's offset when the client needs it to go on (tus answers carry it)."""

    def __init__(self, code: str, message: str, *, offset: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.offset = code, message, offset


# -- rules ----------------------------------------------------------------------------------------


def check_writable(session: Session) -> None:
    """May this session take request bodies at all (tus PATCH, creation-with-upload)?"""
    if session.concat == "final":
        raise Refusal(FINAL_UPLOAD, "a final upload cannot be patched")
    if session.protocol not in states.APPENDED:
        raise Refusal(SEED_SESSION, "this session takes its data through the seed API")
    if session.state in ENDED:
        raise Refusal(session.state, f"the upload was {session.state}")
    if is_deactivated(session):
        raise Refusal(STATE_LOST, "the server lost part of this upload; it cannot go on")
    if session.state == states.PAUSED:
        raise Refusal(
            PAUSED,
            "the upload is paused; resume it with POST /upload/resume",
            offset=session.bytes_written,
        )
    if session.state == states.COMPLETED:
        raise Refusal(COMPLETED, "the upload is already complete")


def check_append(
    session: Session,
    offset: int,
    length: int,
    *,
    declared: int | None = None,
    max_size: int | None = None,
) -> None:
    """May `length` bytes be appended at `offset`, declaring a deferred length `declared`?
    `max_size` (the server's limit) is checked where it is known, at the front end."""
    check_writable(session)
    if offset != session.bytes_written:
        raise Refusal(
            OFFSET_MISMATCH,
            f"Upload-Offset {offset} does not match the upload's offset {session.bytes_written}",
            offset=session.bytes_written,
        )
    if declared is not None:
        if session.total_bytes is not None and declared != session.total_bytes:
            raise Refusal(LENGTH_SET, "Upload-Length is already set")
        if declared < offset + length:
            raise Refusal(LENGTH_TOO_SMALL, "Upload-Length is smaller than the data sent")
        if max_size is not None and declared > max_size:
            raise Refusal(UPLOAD_TOO_LARGE, f"Upload-Length {declared} is larger than Tus-Max-Size")
    total = declared if declared is not None else session.total_bytes
    if total is not None and offset + length > total:
        raise Refusal(
            EXCEEDS_LENGTH, f"the body would take the upload past its length of {total} bytes"
        )
    if total is None and max_size is not None and offset + length > max_size:
        raise Refusal(UPLOAD_TOO_LARGE, "the upload would exceed Tus-Max-Size")


def is_repeat_of_last_append(session: Session, offset: int, length: int) -> bool:
    """An empty append at the end of a completed upload: a client re-sending its last request
    after losing the answer. It changes nothing, so it gets the same success, not a refusal."""
    return (
        session.state == states.COMPLETED
        and session.concat != "final"
        and length == 0
        and offset == session.bytes_written
    )


def check_command(session: Session, action: str, *, completed_too: bool = False) -> None:
    """May the session take a control command? `completed_too`: termination that also removes a
    completed upload (tus DELETE, an operator's expiry), not only an unfinished one."""
    if action not in COMMANDS:
        raise Refusal(UNKNOWN_COMMAND, f"unknown command {action!r}")
    if session.state in ENDED:
        raise Refusal(session.state, f"the upload was {session.state}")
    if session.state == states.COMPLETED and not (action in (TERMINATE, EXPIRE) and completed_too):
        raise Refusal(COMPLETED, "the upload is already complete")
    if action == RESUME and is_deactivated(session):
        raise Refusal(STATE_LOST, "the server lost part of this upload; it cannot go on")
    if action == RESUME and session.state not in resumable_states(session):
        raise Refusal(NOT_PAUSED, f"the upload is {session.state}, not paused")


def resumable_states(session: Session) -> tuple[str, ...]:
    """A paused or failed upload resumes; a seed upload also when it waits for its file again
    (its spool was lost). A tus upload that waits is already open for PATCH: nothing to resume."""
    if session.protocol == states.SEED:
        return (states.PAUSED, states.FAILED, states.WAITING)
    return (states.PAUSED, states.FAILED)


def is_due_to_expire(session: Session, now: float) -> bool:
    """Abandoned: idle past its expiry while waiting for its client (waiting, paused, failed).
    A session a writer is working on is never expired under it."""
    return (
        session.state in (states.WAITING, states.PAUSED, states.FAILED)
        and session.expires_at is not None
        and session.expires_at < now
    )


def is_in_progress(state: str) -> bool:
    """Neither final nor failed: what the active-sessions gauge counts."""
    return state not in states.FINAL_STATES and state != states.FAILED


def draft_length(
    session: Session, offset: int, length: int, *, complete: bool, announced: int | None
) -> int | None:
    """The IETF draft's length rules for `length` bytes at `offset`: the length a request
    `announced` (`Upload-Length`) must agree with the one announced before, the bytes must not
    pass it, and a request that completes the upload must end exactly there. Returns the length
    to declare to the writer (only when `complete`: the record learns it then), else None."""
    known = session.announced_length
    if announced is not None and known is not None and announced != known:
        raise Refusal(
            INCONSISTENT_LENGTH, f"Upload-Length {announced} differs from the {known} announced"
        )
    known = announced if announced is not None else known
    end = offset + length
    if known is not None and end > known:
        raise Refusal(
            INCONSISTENT_LENGTH, f"the content would take the upload past its length of {known}"
        )
    if not complete:
        return None
    if known is not None and end != known:
        raise Refusal(
            INCONSISTENT_LENGTH,
            f"the upload would complete at {end} bytes, but its length is {known}",
        )
    return end


def awaits_completion(session: Session) -> bool:
    """A draft upload whose announced bytes are all in, waiting for `Upload-Complete: ?1`."""
    return (
        session.protocol == states.IETF
        and session.state != states.COMPLETED
        and session.announced_length is not None
        and session.bytes_written >= session.announced_length
    )


def lose_state(session: Session, counted: int) -> None:
    """The disk holds less than the record counted (a power loss took unsynced writes): the
    offset goes back to `counted`. The IETF draft forbids an offset that decreases ('If the
    server loses any part of the state, it MUST deactivate the upload resource'): a draft
    upload fails for good; another continues from `counted` (its client asks the offset)."""
    session.bytes_written = counted
    if session.protocol == states.IETF:
        fail(session, STATE_LOST, "the server lost part of this upload after a crash")


def is_deactivated(session: Session) -> bool:
    """A draft upload whose state was lost: only its termination is left."""
    return session.state == states.FAILED and (session.error or {}).get("code") == STATE_LOST


def is_whole(session: Session) -> bool:
    """Every byte of a known length is counted: completion is due."""
    return session.total_bytes is not None and session.bytes_written >= session.total_bytes


def completion_failed(session: Session) -> bool:
    """Every byte of a tus upload is in, yet it is not completed: completing it failed (a full
    disk or an I/O error while publishing), or a resume is completing it again. Its offset equals
    its length, which a tus client takes for a finished upload, so that offset may be shown only
    once it is completed (the client sends no further PATCH that would complete it)."""
    return (
        session.protocol == states.TUS
        and session.concat != "final"
        and session.state in (states.FAILED, states.WAITING)
        and is_whole(session)
    )


# -- transitions (they change the record; the caller saves it) -----------------------------------


def pause(session: Session) -> None:
    session.state = states.PAUSED


def resume(session: Session) -> bool:
    """Open the session for work again. True when its writer must carry it on by itself: a seed
    upload from its spool, a tus upload's segments that were counted but not yet copied, or
    its completion, when every byte is in (a completion that failed, or a pause, stopped it)."""
    session.error = None
    if session.protocol == states.SEED:
        session.state = states.QUEUED
        return True
    session.state = states.WAITING
    return bool(session.segments) or is_whole(session)


def end(session: Session, action: str) -> None:
    """Terminated by its client, or expired by the sweeper: final."""
    session.state = ENDED_BY[action]


def start_writing(session: Session) -> None:
    session.state = states.WRITING
    session.error = None


def wait_for_data(session: Session) -> None:
    """Between requests: everything received is stored; the client sends more."""
    session.state = states.WAITING
    session.error = None


def wait_for_file(session: Session, code: str, message: str) -> None:
    """A seed upload's spool is gone or short: it waits for its client to send the file again."""
    session.state = states.WAITING
    session.set_error(code, message)


def wait_for_client(session: Session, why: str) -> None:
    """The process that was writing this session is gone (`why` says how): it now waits for
    its client, and a seed upload, whose spool went with that process, for the file again."""
    if session.protocol == states.SEED:
        wait_for_file(
            session,
            "spool_missing",
            f"{why} without this upload's data; resume it by sending the file again",
        )
    else:
        session.state = states.WAITING


def fail(session: Session, code: str, message: str) -> None:
    """Failed, but resumable: the client is told why and may resume or send the bytes again."""
    session.state = states.FAILED
    session.set_error(code, message)


def complete(session: Session, location: str | None) -> None:
    """Every byte stored, the digest checked and the file published at `location`."""
    session.state = states.COMPLETED
    session.location = location if location is not None else session.location
    session.bytes_written = session.total_bytes or session.bytes_written
    session.publishing = None
    session.error = None
    session.expires_at = None


# -- after the end: the live view, retention -------------------------------------------------------


def is_filed_as_finished(session: Session) -> bool:
    """Done with for good: final, except a completed partial upload, whose data a final
    concatenation may still take (it stays with the unfinished sessions, in the live view too)."""
    return session.is_final and not (
        session.concat == "partial" and session.state == states.COMPLETED
    )


def may_leave_live_view(session: Session, now: float, grace: float) -> bool:
    """Ended more than `grace` ago: its record answers from now on. A failed upload stays (it may
    be resumed and counts toward the limits)."""
    return is_filed_as_finished(session) and session.updated_at + grace <= now


def is_tombstone(session: Session) -> bool:
    return session.reduced_at is not None


def is_due_for_tombstone(session: Session, now: float, keep: float) -> bool:
    """A finished record older than `keep` (0 keeps records for ever)."""
    return (
        keep > 0
        and is_filed_as_finished(session)
        and not is_tombstone(session)
        and session.updated_at + keep <= now
    )


def is_due_for_removal(session: Session, now: float, keep: float) -> bool:
    """A tombstone kept for `keep` again."""
    return (
        keep > 0
        and is_tombstone(session)
        and session.reduced_at is not None
        and session.reduced_at + keep <= now
    )


def reduce_to_tombstone(session: Session, now: float) -> Session:
    """What outlives retention: enough to download a completed file (where, its name, type, size,
    digest) and to say how the session ended and whose it was; metadata, parts and errors go."""
    return Session(
        id=session.id,
        protocol=session.protocol,
        filename=session.filename,
        chunk_size=session.chunk_size,
        writer=session.writer,
        total_bytes=session.total_bytes,
        bytes_written=session.bytes_written,
        state=session.state,
        filetype=session.filetype,
        location=session.location,
        sha256=session.sha256,
        owner=session.owner,
        concat=session.concat,
        node=session.node,
        created_at=session.created_at,
        updated_at=session.updated_at,
        reduced_at=now,
    )
