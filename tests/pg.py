"""A throw-away PostgreSQL database on 127.0.0.1:5432, for tests and benchmarks."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from contextlib import contextmanager


def ensure_postgres() -> None:
    """Start the local cluster if it is down (CI machines start it; this is for the odd one that did not)."""
    if subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"]).returncode == 0:
        return
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=False)
    for _ in range(60):
        if subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"]).returncode == 0:
            return
        time.sleep(0.5)
    raise RuntimeError("PostgreSQL did not start on 127.0.0.1:5432")


def admin_connect():
    import psycopg

    try:
        return psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True)
    except psycopg.OperationalError:
        # Password authentication configured: make our own role through the local socket.
        sql = ("DO $$BEGIN CREATE ROLE jhi_test LOGIN SUPERUSER PASSWORD 'jhi_test'; "
               "EXCEPTION WHEN duplicate_object THEN NULL; END$$;")
        subprocess.run(["su", "postgres", "-c", f'psql -c "{sql}"'], check=True)
        return psycopg.connect("host=127.0.0.1 user=jhi_test password=jhi_test dbname=postgres", autocommit=True)


@contextmanager
def temp_database(prefix: str = "jhi_test"):
    """Yields a `postgresql+psycopg://` URL of a new database, dropped on exit."""
    ensure_postgres()
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    with admin_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        user, password = conn.info.user, conn.info.password
    auth = f"{user}:{password}@" if password else f"{user}@"
    try:
        yield f"postgresql+psycopg://{auth}127.0.0.1:5432/{name}"
    finally:
        with admin_connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
