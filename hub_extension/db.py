"""Database access: one engine, sessions per unit of work, blocking calls off the event loop.

Components take a `Session` and are plain synchronous code (testable without Tornado); handlers reach them
through `Database.run`, which runs the call on a small thread pool so the event loop never waits on a
database round trip.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

log = logging.getLogger("hub_extension.db")
logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines (plugins, DDL mode) are noise here
T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"


def normalise_url(url: str) -> str:
    """Accept `postgresql://` and `postgres://` and use psycopg 3 for them."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def make_engine(url: str, *, pool_size: int = 8) -> Engine:
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def unavailable(exc: BaseException | None) -> bool:
    """Whether `exc` means the database cannot be reached now (stopped, restarting, network gone, pool empty):
    callers answer 503 and retry later, rather than failing as for a bug."""
    from sqlalchemy import exc as sa

    return isinstance(exc, sa.OperationalError | sa.InterfaceError | sa.TimeoutError) or (
        isinstance(exc, sa.DBAPIError) and exc.connection_invalidated
    )


class DatabaseMissing(RuntimeError):
    """The configured database does not exist or has no (current) schema."""


class Database:
    """The engine, a session factory, a statement counter and the thread pool for blocking calls."""

    def __init__(self, url: str, *, threads: int = 4):
        self.url = normalise_url(url)
        self.engine = make_engine(self.url, pool_size=threads)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="db")
        # Counted so tests can prove a path made no database round trip.
        self.statements = 0
        event.listen(self.engine, "before_cursor_execute", self._count)

    def _count(self, *_args: Any) -> None:
        self.statements += 1

    @property
    def backend(self) -> str:
        return self.engine.url.get_backend_name()

    @contextmanager
    def session(self):
        """A session that commits on success and rolls back on error."""
        with self.sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.session() as session:
            return fn(session, *args, **kwargs)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(session, *args)` on the database pool, in its own transaction."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(self.call, fn, *args, **kwargs))

    def check_schema(self) -> None:
        """Raise DatabaseMissing unless this is a service database at the newest revision (never creates one)."""
        url = make_url(self.url)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            if not Path(url.database).is_file():  # connecting would create an empty file
                raise DatabaseMissing(f"There is no database at {url.database!r}.")
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        try:
            with self.engine.connect() as conn:
                current = MigrationContext.configure(conn).get_current_revision()
        except OperationalError as e:
            raise DatabaseMissing(f"Cannot open the database at {self.engine.url!r}: {e.orig}") from None
        head = ScriptDirectory.from_config(alembic_config(self.url)).get_current_head()
        if current is None:
            raise DatabaseMissing(f"The database at {self.engine.url!r} has no jupyterhub-inference schema.")
        if current != head:
            raise DatabaseMissing(
                f"The database at {self.engine.url!r} is at revision {current}, not {head}: run `db upgrade`."
            )

    def upgrade(self, revision: str = "head") -> None:
        upgrade(self.url, revision, engine=self.engine)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
        self.engine.dispose()


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head", *, engine: Engine | None = None) -> None:
    """Apply Alembic migrations up to `revision` (idempotent)."""
    from alembic import command

    cfg = alembic_config(url)
    if engine is not None:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    else:
        command.upgrade(cfg, revision)
