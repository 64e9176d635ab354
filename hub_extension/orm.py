"""The service's tables (SQLAlchemy 2). Schema changes go through Alembic (`migrations/`)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class UserStatus:
    ACTIVE = "active"
    PENDING = "pending"
    DISABLED = "disabled"
    ALL = (ACTIVE, PENDING, DISABLED)


class User(Base):
    """A Hub user as this service knows them: mirrored on first sight, kept in step by the Hub sync."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=UserStatus.ACTIVE)
    hub_admin: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    hub_groups: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    hub_roles: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    # False once the Hub no longer lists the user (deleted) or blocks them: every credential is refused.
    in_hub: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    # The Hub's `created` time of this person: a different one under the same name is a new person.
    hub_created: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    last_seen: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    keys: Mapped[list[ApiKey]] = relationship(back_populates="user", cascade="all, delete-orphan")

    def __repr__(self) -> str:
        return f"<User {self.name} {self.status}>"


class ApiKey(Base):
    """A key we issued. Only the SHA-256 of the secret is stored; `prefix` is for display."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_user_id", "user_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    hashed: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)  # sha256 hex, indexed
    prefix: Mapped[str] = mapped_column(String(32), nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    last_used: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # Narrowing (None: everything the owner may do). Enforced by permissions.py.
    features: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(255), nullable=True)  # an admin who issued it

    user: Mapped[User] = relationship(back_populates="keys")

    def __repr__(self) -> str:
        return f"<ApiKey {self.id} {self.prefix}…>"


class Grant(Base):
    """An admin-set permission for a user or a Hub group: allow or deny one feature or one model."""

    __tablename__ = "grants"
    __table_args__ = (UniqueConstraint("subject_kind", "subject", "kind", "target", name="uq_grants_subject"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subject_kind: Mapped[str] = mapped_column(String(16), nullable=False)  # "user" | "group"
    subject: Mapped[str] = mapped_column(String(255), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # "feature" | "model"
    target: Mapped[str] = mapped_column(String(255), nullable=False)
    allow: Mapped[bool] = mapped_column(Boolean, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(255), nullable=True)


class AuditEvent(Base):
    """One security-relevant change. `details` never holds a secret."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_time", "time"),
        Index("ix_audit_subject", "subject"),
        Index("ix_audit_action", "action"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    actor: Mapped[str] = mapped_column(String(255), nullable=False)
    acting_as: Mapped[str | None] = mapped_column(String(255), nullable=True)
    subject: Mapped[str | None] = mapped_column(String(255), nullable=True)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    client_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)


class UsageEvent(Base):
    """One request to `/v1`, whatever came of it (refused, failed, disconnected included). Written in batches by
    `usage.UsageRecorder`, never one commit per request; kept `UsageRecorder.raw_retention_days`."""

    __tablename__ = "usage_events"
    __table_args__ = (Index("ix_usage_events_time", "time"), Index("ix_usage_events_user_time", "user", "time"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False)  # when the request arrived (UTC)
    user: Mapped[str] = mapped_column(String(255), nullable=False)  # "" when there is no user identity
    credential: Mapped[str] = mapped_column(String(16), nullable=False)  # api_key|hub_token|hub_cookie|static_key|none
    key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    acting_admin: Mapped[str | None] = mapped_column(String(255), nullable=True)
    model: Mapped[str] = mapped_column(String(255), nullable=False)  # "" when none was resolved
    endpoint: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[int] = mapped_column(Integer, nullable=False)  # HTTP status; 499: the client went away
    streamed: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    prompt_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    latency_ms: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)  # time to first token (streams)


class UsageRollup(Base):
    """Usage summed per hour, user, model, key and endpoint: what reports and quota windows read, kept after the
    raw events age out. `day` and `month` are stored with each row so both databases group on plain columns."""

    __tablename__ = "usage_rollups"
    __table_args__ = (
        UniqueConstraint("hour", "user", "model", "key_id", "endpoint", name="uq_usage_rollups_bucket"),
        Index("ix_usage_rollups_user_hour", "user", "hour"),
        Index("ix_usage_rollups_day", "day"),
        Index("ix_usage_rollups_month", "month"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hour: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False)  # start of the UTC hour
    day: Mapped[str] = mapped_column(String(10), nullable=False)  # "2026-11-29"
    month: Mapped[str] = mapped_column(String(7), nullable=False)  # "2026-11"
    user: Mapped[str] = mapped_column(String(255), nullable=False)
    model: Mapped[str] = mapped_column(String(255), nullable=False)
    key_id: Mapped[int] = mapped_column(Integer, nullable=False)  # 0: not through one of our keys
    endpoint: Mapped[str] = mapped_column(String(64), nullable=False)
    requests: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    errors: Mapped[int] = mapped_column(Integer, nullable=False, default=0)  # status >= 400 (499 included)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class Quota(Base):
    """Limits for a user, a Hub group or everyone (`subject_kind` "default", subject ""). A null limit is "none
    at this level"; `weight` is the subject's share when a model's queue is contended (fair share)."""

    __tablename__ = "quotas"
    __table_args__ = (UniqueConstraint("subject_kind", "subject", name="uq_quotas_subject"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subject_kind: Mapped[str] = mapped_column(String(16), nullable=False)  # "user" | "group" | "default"
    subject: Mapped[str] = mapped_column(String(255), nullable=False)
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    tokens_per_month: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    weight: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(255), nullable=True)


class Preset(Base):
    """A user's named model + system prompt + generation parameters (`presets.py`); private to its owner."""

    __tablename__ = "presets"
    __table_args__ = (UniqueConstraint("user_id", "name", name="uq_presets_user_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    model: Mapped[str] = mapped_column(String(255), nullable=False)
    system_prompt: Mapped[str] = mapped_column(Text, nullable=False, default="")
    parameters: Mapped[str] = mapped_column(Text, nullable=False, default="{}")  # JSON object
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class Collection(Base):
    """A user's knowledge collection (`knowledge.py`). `version` goes up with every change of its chunks, so a
    process can tell its in-memory matrix of the embeddings is stale."""

    __tablename__ = "collections"
    __table_args__ = (UniqueConstraint("user_id", "name", name="uq_collections_user_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    embedding_model: Mapped[str] = mapped_column(String(255), nullable=False)
    dimensions: Mapped[int | None] = mapped_column(Integer, nullable=True)  # set by the first document
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    documents: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    chunks: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class CollectionDocument(Base):
    """One document added to a collection; its text lives in its chunks."""

    __tablename__ = "collection_documents"
    __table_args__ = (Index("ix_collection_documents_collection", "collection_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), nullable=False)
    title: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    characters: Mapped[int] = mapped_column(Integer, nullable=False)
    chunks: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class CollectionChunk(Base):
    """A piece of a document with its embedding: float32 bytes of a unit-length vector."""

    __tablename__ = "collection_chunks"
    __table_args__ = (
        Index("ix_collection_chunks_collection", "collection_id", "id"),
        Index("ix_collection_chunks_document", "document_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), nullable=False)
    document_id: Mapped[int] = mapped_column(
        ForeignKey("collection_documents.id", ondelete="CASCADE"), nullable=False
    )
    position: Mapped[int] = mapped_column(Integer, nullable=False)  # the chunk's place in its document
    text: Mapped[str] = mapped_column(Text, nullable=False)
    embedding: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)


class LocalAccount(Base):
    """A local login (`login/local.py`): the argon2id hash of the password, never the password. The person's status
    (active / pending / disabled) is the `users` row of the same name."""

    __tablename__ = "local_accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True, nullable=False)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    password_changed_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class Invite(Base):
    """An invitation (`login/invites.py`): only the SHA-256 of its code is stored; used once, at most."""

    __tablename__ = "invites"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hashed: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)  # sha256 hex of the code
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)  # for display
    note: Mapped[str] = mapped_column(Text, nullable=False, default="")
    groups: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(255), nullable=False)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False)
    used_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    used_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
