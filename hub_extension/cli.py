"""Admin commands for the server's shell: `jupyterhub-inference keys|users|db ...`.

They work on the database directly (the service may be running: SQLite WAL and PostgreSQL both allow it)
and record what they change in the audit log as actor `cli:<OS user>`.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys

from .api_keys import KeyManager
from .audit import AuditLog
from .db import Database
from .errors import ApiError
from .permissions import FEATURES
from .users import UserDirectory


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jupyterhub-inference", description="Administer jupyterhub-inference.")
    parser.add_argument(
        "--db-url", default=os.environ.get("INFERENCE_DB_URL", "sqlite:///inference.sqlite"),
        help="database URL (default: $INFERENCE_DB_URL or sqlite:///inference.sqlite)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub = parser.add_subparsers(dest="group", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="apply migrations up to the newest revision")

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    k_list = keys.add_parser("list", help="list a user's keys")
    k_list.add_argument("--user", required=True)
    k_list.add_argument("--all", action="store_true", help="include revoked keys")
    k_create = keys.add_parser("create", help="issue a key for a user (printed once)")
    k_create.add_argument("--user", required=True)
    k_create.add_argument("--name", required=True)
    k_create.add_argument("--expires-in-days", type=int, default=None)
    k_create.add_argument("--features", help="comma-separated subset of: " + ",".join(FEATURES))
    k_create.add_argument("--models", help="comma-separated model names")
    k_revoke = keys.add_parser("revoke", help="revoke one key (--id) or all of a user's keys (--all)")
    k_revoke.add_argument("--user", required=True)
    target = k_revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--id", type=int)
    target.add_argument("--all", action="store_true")

    users = sub.add_parser("users", help="users").add_subparsers(dest="action", required=True)
    users.add_parser("list", help="list users")
    return parser


def _print(rows: list[dict], columns: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    widths = {c: max([len(c)] + [len(str(r.get(c) if r.get(c) is not None else "-")) for r in rows]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c) if r.get(c) is not None else "-").ljust(widths[c]) for c in columns))


async def _run(args) -> int:
    db = Database(args.db_url, threads=1)
    try:
        db.upgrade()
        if args.group == "db":
            print(f"database at {db.backend} is up to date")
            return 0
        users = UserDirectory(db, cache_seconds=0)
        keys = KeyManager(db, known_features=frozenset(FEATURES))
        audit_actor = f"cli:{getpass.getuser()}"
        if args.group == "users":
            rows = await users.list()
            _print(rows, ["name", "status", "hub_admin", "groups", "in_hub", "last_seen"], args.json)
            return 0
        state = await users.by_name(args.user)
        audit = {"actor": audit_actor, "subject": state.name, "client_ip": None}
        if args.action == "list":
            rows = await keys.list(state.id, include_revoked=args.all)
            _print(rows, ["id", "name", "prefix", "created_at", "expires_at", "last_used", "revoked_at"], args.json)
        elif args.action == "create":
            body = {"name": args.name}
            if args.expires_in_days is not None:
                body["expires_in_days"] = args.expires_in_days
            if args.features:
                body["features"] = [f.strip() for f in args.features.split(",") if f.strip()]
            if args.models:
                body["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
            secret, model = await keys.create(
                state.id, created_by=audit_actor, audit=audit, **keys.validate_request(body)
            )
            print(json.dumps({**model, "key": secret}, indent=2) if args.json else secret)
        elif args.action == "revoke":
            revoked = await keys.revoke(state.id, None if args.all else args.id, audit=audit)
            print(f"revoked {len(revoked)} key(s)")
        return 0
    except ApiError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    finally:
        db.close()


def run_cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return asyncio.run(_run(args))


__all__ = ["run_cli", "AuditLog"]
