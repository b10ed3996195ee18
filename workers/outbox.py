"""A writer's reply pipe: answers to requests (`Reply`) and news nobody asked for (`Event`)."""

from __future__ import annotations

from multiprocessing.connection import Connection

from upload_server.sessions.lifecycle import Refusal
from upload_server.sessions.record import Session

from .messages import Event, Reply


class Outbox:
    def __init__(self, replies: Connection) -> None:
        self._replies = replies

    def reply(
        self,
        request_id: int | None,
        session: Session | None = None,
        *,
        code: str | None = None,
        message: str | None = None,
        length: int | None = None,
    ) -> None:
        """Answer a request (work sent without a request id, a `Drain`, waits for no answer)."""
        if request_id is None:
            return
        record = session.to_dict() if session is not None else None
        self._replies.send(Reply(request_id, record, code, message, length))

    def refuse(self, request_id: int | None, session: Session | None, refusal: Refusal) -> None:
        self.reply(request_id, session, code=refusal.code, message=refusal.message)

    def emit(self, kind: str, session: Session) -> None:
        self._replies.send(Event(kind, session.to_dict()))
