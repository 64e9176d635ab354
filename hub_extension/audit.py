"""The audit log: one row per security-relevant change. Callers pass details without secrets."""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from .db import Database
from .orm import AuditEvent, utcnow

log = logging.getLogger("hub_extension.audit")


def event_model(row: AuditEvent) -> dict:
    return {
        "id": row.id,
        "time": row.time.isoformat() + "Z",
        "actor": row.actor,
        "acting_as": row.acting_as,
        "subject": row.subject,
        "action": row.action,
        "details": row.details,
        "client_ip": row.client_ip,
    }


class AuditLog:
    def __init__(self, db: Database):
        self.db = db

    @staticmethod
    def add(
        session: Session,
        *,
        actor: str,
        action: str,
        subject: str | None = None,
        details: dict | None = None,
        client_ip: str | None = None,
        acting_as: str | None = None,
    ) -> None:
        """Add an entry inside the caller's transaction, so the change and its record land together."""
        session.add(
            AuditEvent(
                time=utcnow(),
                actor=actor,
                acting_as=acting_as,
                subject=subject,
                action=action,
                details=details or {},
                client_ip=client_ip,
            )
        )
        log.info("audit: %s %s %s", actor, action, subject or "")

    async def record(self, **fields) -> None:
        await self.db.run(lambda session: self.add(session, **fields))

    @staticmethod
    def _query(
        session: Session,
        user: str | None,
        action: str | None,
        since: dt.datetime | None,
        until: dt.datetime | None,
        limit: int,
    ) -> list[dict]:
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if user:
            query = query.where((AuditEvent.subject == user) | (AuditEvent.actor == user) | (AuditEvent.acting_as == user))
        if action:
            query = query.where(AuditEvent.action == action)
        if since:
            query = query.where(AuditEvent.time >= since)
        if until:
            query = query.where(AuditEvent.time < until)
        return [event_model(row) for row in session.execute(query).scalars()]

    async def query(self, *, user=None, action=None, since=None, until=None, limit: int = 100) -> list[dict]:
        return await self.db.run(self._query, user, action, since, until, limit)
