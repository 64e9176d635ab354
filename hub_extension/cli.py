"""Admin commands for the server's shell: `jupyterhub-inference keys|users|grants|audit|db ...`.

They work on the database directly (the service may be running: SQLite WAL and PostgreSQL both allow it)
and record what they change in the audit log as actor `cli:<OS user>`. A running service sees grant changes
within `grants_reload_seconds` and status changes within `user_cache_seconds`.

The CLI has no Hub connection: it acts on users the service has seen (others are "no such user"), and
`grants show --config` reads the service's config file for feature defaults and Hub roles.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys

from .administration import UserAdmin, parse_audit_query
from .api_keys import KeyManager
from .audit import AuditLog
from .db import Database
from .errors import ApiError, BadRequest
from .permissions import FEATURES, PermissionPolicy
from .users import STATUS_ACTIONS, UserDirectory

GRANT_VALUES = {"allow": True, "on": True, "true": True, "deny": False, "off": False, "false": False,
                "clear": None, "none": None}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jupyterhub-inference", description="Administer jupyterhub-inference.")
    parser.add_argument(
        "--db-url", default=os.environ.get("INFERENCE_DB_URL", "sqlite:///inference.sqlite"),
        help="database URL (default: $INFERENCE_DB_URL or sqlite:///inference.sqlite)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    # The same two options after the command too (`jupyterhub-inference users list --db-url ...`): the entry
    # point only hands argv to the CLI when it starts with a command name.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db-url", default=argparse.SUPPRESS, help="database URL")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", parents=[common], help="apply migrations up to the newest revision")

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    k_list = keys.add_parser("list", parents=[common], help="list a user's keys")
    k_list.add_argument("--user", required=True)
    k_list.add_argument("--all", action="store_true", help="include revoked keys")
    k_create = keys.add_parser("create", parents=[common], help="issue a key for a user (printed once)")
    k_create.add_argument("--user", required=True)
    k_create.add_argument("--name", required=True)
    k_create.add_argument("--expires-in-days", type=int, default=None)
    k_create.add_argument("--features", help="comma-separated subset of: " + ",".join(FEATURES))
    k_create.add_argument("--models", help="comma-separated model names")
    k_revoke = keys.add_parser("revoke", parents=[common], help="revoke one key (--id) or all of a user's keys (--all)")
    k_revoke.add_argument("--user", required=True)
    target = k_revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--id", type=int)
    target.add_argument("--all", action="store_true")

    users = sub.add_parser("users", help="users").add_subparsers(dest="action", required=True)
    u_list = users.add_parser("list", parents=[common], help="list users the service has seen")
    u_list.add_argument("--status", choices=["active", "pending", "disabled"])
    for action in STATUS_ACTIONS:
        users.add_parser(action, parents=[common], help=f"{action} a user").add_argument("name")

    grants = sub.add_parser("grants", help="database grants").add_subparsers(dest="action", required=True)
    for action in ("show", "set"):
        g = grants.add_parser(action, parents=[common], help="show a user's effective permissions" if action == "show"
                              else "allow, deny or clear features and models for a user or a group")
        who = g.add_mutually_exclusive_group(required=True)
        who.add_argument("--user")
        who.add_argument("--group")
        if action == "show":
            g.add_argument("--config", help="the service's config file (feature defaults, hub_roles)")
        else:
            g.add_argument("--feature", action="append", default=[], metavar="NAME=allow|deny|clear")
            g.add_argument("--model", action="append", default=[], metavar="NAME=allow|deny|clear")

    audit = sub.add_parser("audit", parents=[common], help="read the audit log (newest first)")
    audit.add_argument("--user", help="entries where this user is actor, subject or acted as")
    audit.add_argument("--action", help="e.g. key.create, grants.set, user.disable, impersonate")
    audit.add_argument("--since", help="ISO 8601 time")
    audit.add_argument("--until", help="ISO 8601 time")
    audit.add_argument("--limit", default="100")
    return parser


def _policy(db: Database, config: str | None = None) -> PermissionPolicy:
    """The permission policy as the service would build it from `config` (defaults when none)."""
    from .app import InferenceService
    from .identity import Authenticator, StaticKeys

    service = InferenceService()
    if config:
        service.load_config_file(config)
    roles = Authenticator(mode="hub", static_keys=StaticKeys([]), hub_roles=service.hub_roles)
    policy = PermissionPolicy(service.feature_defaults, model_default_allow=service.model_default_allow,
                              role_scopes=roles.scopes_from_roles, db=db)
    policy.load()
    return policy


def _grant_changes(args) -> dict:
    body: dict[str, dict] = {"features": {}, "models": {}}
    for section, items in (("features", args.feature), ("models", args.model)):
        for item in items:
            name, sep, value = item.rpartition("=")
            if not sep or value.lower() not in GRANT_VALUES:
                raise BadRequest(f"{item!r}: use NAME=allow, NAME=deny or NAME=clear.")
            body[section][name] = GRANT_VALUES[value.lower()]
    return PermissionPolicy.parse_grants(body, partial=True)


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
        if args.command == "db":
            print(f"database at {db.backend} is up to date")
            return 0
        users = UserDirectory(db, cache_seconds=0)
        keys = KeyManager(db, known_features=frozenset(FEATURES))
        audit_actor = f"cli:{getpass.getuser()}"
        if args.command == "users":
            if args.action == "list":
                rows = await UserAdmin(users, _policy(db)).list(args.status)
                _print(rows, ["name", "status", "role", "groups", "in_hub", "last_seen"], args.json)
                return 0
            audit = {"actor": audit_actor, "subject": args.name, "client_ip": None}
            state = await users.apply_action(args.name, args.action, audit=audit)
            print(f"{state.name}: {state.status}")
            return 0
        if args.command == "grants":
            return await _grants(args, db, users, audit_actor)
        if args.command == "audit":
            query = parse_audit_query(vars(args))
            rows = await AuditLog(db).query(**query)
            _print(rows, ["time", "actor", "acting_as", "action", "subject", "details"], args.json)
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


async def _grants(args, db: Database, users: UserDirectory, audit_actor: str) -> int:
    kind, name = ("user", args.user) if args.user else ("group", args.group)
    if kind == "user":
        state = await users.by_name(name)  # no such user: error
    policy = _policy(db, getattr(args, "config", None))
    if args.action == "set":
        subject = name if kind == "user" else f"group:{name}"
        audit = {"actor": audit_actor, "subject": subject, "client_ip": None}
        grants = await policy.set_grants(kind, name, _grant_changes(args), replace=False, audit=audit)
        print(json.dumps(grants, indent=2))
        return 0
    if kind == "group":
        print(json.dumps(policy.grants("group", name), indent=2))
        return 0
    effective = policy.effective(state)
    if args.json:
        print(json.dumps({"grants": policy.grants("user", name), "effective": effective}, indent=2))
        return 0
    rows = [{"feature/model": k, **v} for k, v in effective["features"].items()]
    rows += [{"feature/model": f"model:{k}", **v} for k, v in effective["models"].items()]
    rows.append({"feature/model": "model:(others)", **effective["other_models"]})
    print(f"{name} (groups: {', '.join(effective['groups']) or '-'}); {effective['precedence']}")
    _print(rows, ["feature/model", "allowed", "source", "via"], False)
    return 0


def run_cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return asyncio.run(_run(args))

