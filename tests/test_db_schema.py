"""The database schema: what the migrations build is what `orm.py` declares, SQLite runs in WAL mode, and an
upgrade keeps the data of an older database. Fast tier (no Hub), on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from pg import temp_database
from sqlalchemy import Column, Integer, MetaData, inspect, text

from hub_extension import db as dbmod
from hub_extension import key_format
from hub_extension.api_keys import KeyManager
from hub_extension.db import Database, DatabaseMissing
from hub_extension.orm import ApiKey, Base, User
from hub_extension.users import UserDirectory


def schema_differences(database: Database, metadata: MetaData = Base.metadata) -> list:
    """What Alembic's autogenerate would change to make the database match `metadata` (types included)."""
    with database.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, metadata)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    """A URL of a database with nothing in it, not even the Alembic version table."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.sqlite'}"
        return
    with temp_database("jhi_schema") as url:
        yield url


def test_the_migrations_build_the_schema_orm_declares(db):
    assert schema_differences(db) == []


def test_the_comparison_sees_a_difference(db):
    """The check above is not vacuous: a column the database lacks is reported."""
    metadata = MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(metadata)
    metadata.tables["users"].append_column(Column("shoe_size", Integer, nullable=True))
    differences = schema_differences(db, metadata)
    assert [(d[0], d[2], d[3].name) for d in differences] == [("add_column", "users", "shoe_size")]


def test_sqlite_runs_in_wal_mode(tmp_path):
    path = tmp_path / "wal.sqlite"
    database = Database(f"sqlite:///{path}")
    try:
        database.upgrade()
        with database.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        database.close()
    # WAL is kept in the file itself: any other program that opens it (a backup, `sqlite3`) sees it too.
    with sqlite3.connect(path) as plain:
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    plain.close()


def upgrade_until(url: str, *tables: str) -> str:
    """Apply the migrations one at a time, oldest first, until all of `tables` exist: that revision."""
    script = ScriptDirectory.from_config(dbmod.alembic_config(url))
    for revision in reversed(list(script.walk_revisions())):  # oldest first
        dbmod.upgrade(url, revision.revision)
        engine = dbmod.make_engine(url)
        try:
            if set(tables) <= set(inspect(engine).get_table_names()):
                return revision.revision
        finally:
            engine.dispose()
    raise AssertionError(f"no migration creates {tables}")


async def test_upgrading_an_old_database_keeps_its_users_and_keys(empty_url):
    oldest = upgrade_until(empty_url, "users", "api_keys")  # as a service of that time left it
    assert oldest == "0001"

    secret = key_format.generate()
    created = dt.datetime(2026, 11, 27, 19, 0, 0)
    expires = dt.datetime(2099, 1, 1)
    old = Database(empty_url, threads=1)
    try:
        with pytest.raises(DatabaseMissing, match=f"revision {oldest}, not .*db upgrade"):
            old.check_schema()
        with old.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO users (name, status, hub_admin, hub_groups, hub_roles, in_hub, created_at)"
                    " VALUES ('alice', 'active', false, :groups, :roles, true, :created)"
                ),
                {"groups": '["staff"]', "roles": '["user"]', "created": created},
            )
            alice = conn.execute(text("SELECT id FROM users WHERE name = 'alice'")).scalar_one()
            conn.execute(
                text(
                    "INSERT INTO api_keys (user_id, name, hashed, prefix, created_at, expires_at, features, models)"
                    " VALUES (:alice, 'laptop', :hashed, :prefix, :created, :expires, :features, NULL)"
                ),
                {
                    "alice": alice,
                    "hashed": key_format.hash_key(secret),
                    "prefix": key_format.display_prefix(secret),
                    "created": created,
                    "expires": expires,
                    "features": '["chat"]',
                },
            )
    finally:
        old.close()

    database = Database(empty_url, threads=2)
    try:
        database.upgrade()
        database.check_schema()  # now at the newest revision
        assert schema_differences(database) == []

        user = database.call(lambda s: s.get(User, alice))
        assert (user.name, user.status, user.hub_groups, user.hub_roles, user.in_hub) == (
            "alice", "active", ["staff"], ["user"], True,
        )
        assert user.created_at == created and user.hub_created is None  # the column 0002 added, empty
        key = database.call(lambda s: s.query(ApiKey).one())
        assert (key.user_id, key.name, key.hashed, key.features, key.models, key.expires_at) == (
            alice, "laptop", key_format.hash_key(secret), ["chat"], None, expires,
        )

        # The service reads them as it reads its own rows: the user by name, the key by its secret.
        state = await UserDirectory(database).by_name("alice")
        assert (state.id, state.status, state.groups, state.in_hub) == (alice, "active", ("staff",), True)
        record = await KeyManager(database).check(secret)
        assert (record.id, record.user_id, record.name, record.features, record.revoked) == (
            key.id, alice, "laptop", ("chat",), False,
        )
    finally:
        database.close()
