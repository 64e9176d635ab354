"""Admin commands: `jupyterhub-inference users|keys|grants|audit|db ...`, subcommands of the service application.

As JupyterHub's `upgrade-db`: each command is a traitlets Application whose root is `InferenceService`, so it
reads the same config file and environment as `serve` and builds the same components from them. Only
`db upgrade` creates or upgrades a schema; every other command on a missing database says so and exits 1.

They work on the database directly (the service may be running: SQLite WAL and PostgreSQL both allow it) and
record what they change in the audit log as actor `cli:<OS user>`. A running service sees grant changes within
`PermissionPolicy.reload_seconds` and status changes within `UserDirectory.cache_seconds`. The CLI has no Hub
connection: it acts on users the service has seen (others are "no such user").

This module never imports `app` at module level: the application names these classes by import string.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import sys

from traitlets import Bool, Enum, Float, Integer, List, Unicode
from traitlets.config import Application

from .db import DatabaseMissing
from .errors import ApiError, BadRequest
from .orm import UserStatus
from .scopes import FEATURES
from .users import STATUS_ACTIONS

GRANT_VALUES = {"allow": True, "on": True, "true": True, "deny": False, "off": False, "false": False,
                "clear": None, "none": None}
COMMON_ALIASES = {
    "db-url": "InferenceService.db_url",
    "config": "InferenceService.config_file",
    "log-level": "Application.log_level",
}


def options(command: str, *traits: str, **renamed: str) -> dict:
    """The common options plus `--<trait>` for each named trait of `command` (`--<option>` for renamed ones)."""
    own = {t.replace("_", "-"): f"{command}.{t}" for t in traits}
    own.update({option.replace("_", "-"): f"{command}.{trait}" for option, trait in renamed.items()})
    return {**COMMON_ALIASES, **own}


def commands(**classes: type[Application]) -> dict:
    """A group's `subcommands`: each name with its class and the class's description as help."""
    return {name: (cls, cls.description) for name, cls in classes.items()}


class Group(Application):
    """A command that only groups subcommands (`users`, `keys`, `grants`, `db`): without one, print help."""

    def start(self):
        if self.subapp is not None:
            return self.subapp.start()
        self.print_subcommands()
        self.exit(2)


class Command(Application):
    """One admin command: the root application's settings, its components, and a table or JSON printed."""

    aliases = COMMON_ALIASES
    flags = {"json": ({"Command": {"json": True}}, "Print JSON instead of a table.")}
    json = Bool(False, help="Print JSON instead of a table.").tag(config=True)

    def __init__(self, **kwargs):
        from .app import InferenceService  # here, not at import: the application names this module's classes

        super().__init__(**kwargs)
        self.classes = [type(self), InferenceService]  # so --help can describe its options and --db-url, --config

    @property
    def service(self):
        app = self.parent
        while app.parent is not None:
            app = app.parent
        return app

    def initialize(self, argv=None):
        super().initialize(argv)
        if "log_level" not in self.cli_config.get("Application", {}):
            self.service.log_level = "WARN"  # a command prints its answer; the log says only what went wrong
        self.service.load_settings(self.cli_config)

    def start(self):
        try:
            code = asyncio.run(self.run())
        except DatabaseMissing as e:
            print(f"error: {e} Point --db-url or --config (or $INFERENCE_CONFIG) at the service's database, "
                  "or create one with `jupyterhub-inference db upgrade`.", file=sys.stderr)
            code = 1
        except ApiError as e:
            print(f"error: {e.message}", file=sys.stderr)
            code = 1
        self.exit(code)

    async def run(self) -> int:
        db = self.service.open_database(create_schema=False)
        try:
            self.users, self.keys, self.permissions = self.service.make_components(db)
            return await self.act(db)
        finally:
            db.close()

    async def act(self, db) -> int:
        raise NotImplementedError

    @property
    def actor(self) -> str:
        return f"cli:{getpass.getuser()}"

    def audit(self, subject: str) -> dict:
        return {"actor": self.actor, "subject": subject, "client_ip": None}

    def argument(self, what: str) -> str:
        if len(self.extra_args) != 1:
            raise BadRequest(f"Give exactly one {what}.")
        return self.extra_args[0]

    def show(self, rows: list[dict], columns: list[str]) -> None:
        if self.json:
            print(json.dumps(rows, indent=2, default=str))
            return

        def cell(row: dict, column: str) -> str:
            value = row.get(column)
            return "-" if value is None else str(value)

        widths = {c: max([len(c)] + [len(cell(r, c)) for r in rows]) for c in columns}
        print("  ".join(c.upper().ljust(widths[c]) for c in columns))
        for r in rows:
            print("  ".join(cell(r, c).ljust(widths[c]) for c in columns))


# -- db ------------------------------------------------------------------------------------------------


class DbUpgrade(Command):
    description = "Create the database, or apply migrations up to the newest revision."

    async def run(self) -> int:
        db = self.service.open_database(create_schema=True)
        db.close()
        print(f"database ({db.backend}) is up to date")
        return 0


class DbCommand(Group):
    description = "The service's database schema."
    subcommands = commands(upgrade=DbUpgrade)


# -- users ---------------------------------------------------------------------------------------------


class UsersList(Command):
    description = "List the users the service has seen."
    aliases = options("UsersList", "status")
    status = Enum(list(UserStatus.ALL), None, allow_none=True, help="Only users with this status.").tag(config=True)

    async def act(self, db) -> int:
        from .administration import UserAdmin
        from .usage import UsageReports

        rows = await UserAdmin(self.users, self.permissions, usage=UsageReports(db)).list(self.status)
        for row in rows:
            row["tokens_30d"] = row["usage_30d"]["total_tokens"]
        self.show(rows, ["name", "status", "role", "groups", "in_hub", "last_seen", "tokens_30d"])
        return 0


class UserAction(Command):
    """`users approve|deny|disable|enable NAME` (the action is the subcommand's name)."""

    action = ""

    async def act(self, db) -> int:
        name = self.argument("user name")
        state = await self.users.apply_action(name, self.action, audit=self.audit(name))
        print(f"{state.name}: {state.status}")
        return 0


def _user_action(action: str) -> type[UserAction]:
    description = f"{action.title()} a user: users {action} NAME"
    return type(f"Users{action.title()}", (UserAction,), {"action": action, "description": description})


class UsersResetPassword(Command):
    description = "Give a user a new local password (generated, printed once): users reset-password NAME"

    async def act(self, db) -> int:
        from .login import store
        from .login.passwords import generate_password, hash_password

        name = self.argument("user name")
        await self.users.by_name(name)  # the CLI knows only users the service has seen
        password = generate_password()
        await db.run(store.set_password, name, hash_password(password), self.audit(name), action="password.reset",
                     create=True)
        print(json.dumps({"name": name, "password": password}) if self.json else password)
        return 0


class UsersCommand(Group):
    description = "List users; approve, deny, disable or enable one; reset a local password."
    subcommands = commands(list=UsersList, **{action: _user_action(action) for action in STATUS_ACTIONS},
                           **{"reset-password": UsersResetPassword})


# -- keys ----------------------------------------------------------------------------------------------


class KeyCommand(Command):
    """A command on one user's keys (`--user NAME`)."""

    user = Unicode("", help="The user whose keys these are.").tag(config=True)

    async def owner(self):
        if not self.user:
            raise BadRequest("--user NAME is required.")
        return await self.users.by_name(self.user)


class KeysList(KeyCommand):
    description = "List a user's keys."
    aliases = options("KeysList", "user")
    flags = {**Command.flags, "all": ({"KeysList": {"include_revoked": True}}, "Include revoked keys.")}
    include_revoked = Bool(False, help="Include revoked keys.").tag(config=True)

    async def act(self, db) -> int:
        state = await self.owner()
        rows = await self.keys.list(state.id, include_revoked=self.include_revoked)
        self.show(rows, ["id", "name", "prefix", "created_at", "expires_at", "last_used", "revoked_at"])
        return 0


class KeysCreate(KeyCommand):
    description = "Issue a key for a user (the secret is printed once)."
    aliases = options("KeysCreate", "user", "expires_in_days", "features", "models", name="key_name")
    key_name = Unicode("", help="The key's name.").tag(config=True)
    expires_in_days = Integer(None, allow_none=True, help="Lifetime in days (default: the service's).").tag(
        config=True
    )
    features = Unicode("", help="Comma-separated subset of: " + ",".join(FEATURES)).tag(config=True)
    models = Unicode("", help="Comma-separated model names the key is narrowed to.").tag(config=True)

    async def act(self, db) -> int:
        state = await self.owner()
        body: dict = {"name": self.key_name}
        if self.expires_in_days is not None:
            body["expires_in_days"] = self.expires_in_days
        for field in ("features", "models"):
            if getattr(self, field):
                body[field] = [v.strip() for v in getattr(self, field).split(",") if v.strip()]
        secret, model = await self.keys.create(
            state.id, created_by=self.actor, audit=self.audit(state.name), **self.keys.validate_request(body)
        )
        print(json.dumps({**model, "key": secret}, indent=2) if self.json else secret)
        return 0


class KeysRevoke(KeyCommand):
    description = "Revoke one key (--id N) or all of a user's keys (--all)."
    aliases = options("KeysRevoke", "user", id="key_id")
    flags = {**Command.flags, "all": ({"KeysRevoke": {"revoke_all": True}}, "Revoke every key of the user.")}
    key_id = Integer(None, allow_none=True, help="The key to revoke.").tag(config=True)
    revoke_all = Bool(False, help="Revoke every key of the user.").tag(config=True)

    async def act(self, db) -> int:
        if (self.key_id is None) == (not self.revoke_all):
            raise BadRequest("Give --id N or --all.")
        state = await self.owner()
        revoked = await self.keys.revoke(state.id, self.key_id, audit=self.audit(state.name))
        print(f"revoked {len(revoked)} key(s)")
        return 0


class KeysCommand(Group):
    description = "List, create or revoke a user's API keys."
    subcommands = commands(list=KeysList, create=KeysCreate, revoke=KeysRevoke)


# -- grants --------------------------------------------------------------------------------------------


class GrantCommand(Command):
    """A command on one user's (`--user`) or one Hub group's (`--group`) grants."""

    user = Unicode("", help="A user.").tag(config=True)
    group = Unicode("", help="A Hub group.").tag(config=True)

    def subject(self) -> tuple[str, str]:
        if bool(self.user) == bool(self.group):
            raise BadRequest("Give --user NAME or --group NAME.")
        return ("user", self.user) if self.user else ("group", self.group)


class GrantsShow(GrantCommand):
    description = "Show a user's effective permissions (with their sources), or a group's grants."
    aliases = options("GrantsShow", "user", "group")

    async def act(self, db) -> int:
        kind, name = self.subject()
        if kind == "group":
            print(json.dumps(self.permissions.grants("group", name), indent=2))
            return 0
        effective = self.permissions.effective(await self.users.by_name(name))
        if self.json:
            print(json.dumps({"grants": self.permissions.grants("user", name), "effective": effective}, indent=2))
            return 0
        rows = [{"feature/model": k, **v} for k, v in effective["features"].items()]
        rows += [{"feature/model": f"model:{k}", **v} for k, v in effective["models"].items()]
        rows.append({"feature/model": "model:(others)", **effective["other_models"]})
        print(f"{name} (groups: {', '.join(effective['groups']) or '-'}); {effective['precedence']}")
        self.json = False
        self.show(rows, ["feature/model", "allowed", "source", "via"])
        return 0


class GrantsSet(GrantCommand):
    description = "Allow, deny or clear features and models for a user or a group."
    aliases = options("GrantsSet", "user", "group", "feature", "model")
    feature = List(Unicode(), help="NAME=allow|deny|clear (repeatable).").tag(config=True)
    model = List(Unicode(), help="NAME=allow|deny|clear (repeatable).").tag(config=True)

    def changes(self) -> dict:
        body: dict[str, dict] = {"features": {}, "models": {}}
        for section, items in (("features", self.feature), ("models", self.model)):
            for item in items:
                name, sep, value = item.rpartition("=")
                if not sep or value.lower() not in GRANT_VALUES:
                    raise BadRequest(f"{item!r}: use NAME=allow, NAME=deny or NAME=clear.")
                body[section][name] = GRANT_VALUES[value.lower()]
        return self.permissions.parse_grants(body, partial=True)

    async def act(self, db) -> int:
        kind, name = self.subject()
        if kind == "user":
            await self.users.by_name(name)  # no such user: error
        subject = name if kind == "user" else f"group:{name}"
        grants = await self.permissions.set_grants(kind, name, self.changes(), replace=False, audit=self.audit(subject))
        print(json.dumps(grants, indent=2))
        return 0


class GrantsCommand(Group):
    description = "Show or set grants for a user or a group."
    subcommands = commands(show=GrantsShow, set=GrantsSet)


# -- audit ---------------------------------------------------------------------------------------------


class AuditCommand(Command):
    description = "Read the audit log, newest first."
    aliases = options("AuditCommand", "user", "action", "since", "until", "limit")
    user = Unicode("", help="Entries where this user is actor, subject or acted as.").tag(config=True)
    action = Unicode("", help="e.g. key.create, grants.set, user.disable, impersonate").tag(config=True)
    since = Unicode("", help="ISO 8601 time.").tag(config=True)
    until = Unicode("", help="ISO 8601 time.").tag(config=True)
    limit = Unicode("100", help="Most entries to print.").tag(config=True)

    async def act(self, db) -> int:
        from .administration import parse_audit_query
        from .audit import AuditLog

        query = parse_audit_query({k: getattr(self, k) for k in ("user", "action", "since", "until", "limit")})
        self.show(await AuditLog(db).query(**query), ["time", "actor", "acting_as", "action", "subject", "details"])
        return 0


def run(argv: list[str]) -> int:
    """Run one command line of the application in this process (tests, scripts); returns its exit code.

    The application and its commands are traitlets singletons, so each is cleared after the run.
    """
    from traitlets import TraitError

    from .app import InferenceService, configuration_error

    app = InferenceService.instance()
    try:
        app.initialize(argv)
        app.start()
        return 0
    except (ValueError, TraitError) as e:  # as `main` answers them
        return configuration_error(e)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        while app is not None:
            type(app).clear_instance()
            app = app.subapp


# -- usage ---------------------------------------------------------------------------------------------


class UsageCommand(Command):
    description = "Usage by hour, day or month, grouped by user, model, key or endpoint (from the hourly rollups)."
    aliases = options("UsageCommand", "user", "since", "until", "bucket", "group_by")
    flags = {**Command.flags, "csv": ({"UsageCommand": {"csv": True}}, "Print CSV instead of a table.")}
    user = List(Unicode(), help="Only these users (repeatable, or comma-separated).").tag(config=True)
    since = Unicode("", help="ISO 8601 time or date.").tag(config=True)
    until = Unicode("", help="ISO 8601 time or date.").tag(config=True)
    bucket = Unicode("day", help="hour, day or month.").tag(config=True)
    group_by = Unicode("user", help="user, model, key, endpoint or none.").tag(config=True)
    csv = Bool(False, help="Print CSV instead of a table.").tag(config=True)

    async def act(self, db) -> int:
        from .usage import UsageReports, parse_report_query, to_csv, totals

        args = {"user": ",".join(self.user), **{k: getattr(self, k) for k in ("since", "until", "bucket", "group_by")}}
        query = parse_report_query(args)
        rows = await UsageReports(db).query(**query)
        if self.csv:
            print(to_csv(rows), end="")
            return 0
        if not self.json:
            rows.append({"bucket": "total", **totals(rows)})
        self.show(rows, ["bucket", "group", "requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens"])
        return 0


# -- quotas --------------------------------------------------------------------------------------------


class QuotaCommand(Command):
    """A command on the quota of one user (`--user`), one Hub group (`--group`) or everyone (`--default`)."""

    flags = {**Command.flags, "default": ({"QuotaCommand": {"default": True}}, "The default for everyone.")}
    user = Unicode("", help="A user (one the service has seen).").tag(config=True)
    group = Unicode("", help="A Hub group.").tag(config=True)
    default = Bool(False, help="The default for everyone (below user and group quotas).").tag(config=True)

    async def act(self, db) -> int:
        from .quotas import QuotaPolicy

        if [bool(self.user), bool(self.group), self.default].count(True) != 1:
            raise BadRequest("Give --user NAME, --group NAME or --default.")
        kind, name = ("user", self.user) if self.user else ("group", self.group) if self.group else ("default", "")
        state = await self.users.by_name(name) if kind == "user" else None  # no such user: error
        quotas = QuotaPolicy(db, parent=self.service)
        quotas.load()
        values = self.values(quotas.quota(kind, name))
        if values is not None:
            subject = {"user": name, "group": f"group:{name}", "default": "quotas:default"}[kind]
            await quotas.set_quota(kind, name, quotas.parse_quota(values), audit=self.audit(subject))
        quota = quotas.quota(kind, name)
        if state is not None:
            quota["effective"] = await quotas.remaining(state)
        print(json.dumps(quota, indent=2))
        return 0

    def values(self, current: dict) -> dict | None:
        """The row to write, from the current one (None: change nothing)."""
        return None


class QuotasShow(QuotaCommand):
    description = "Show the quota of a user (with the limits in effect and what is left), a group or the default."
    aliases = options("QuotasShow", "user", "group")


class QuotasSet(QuotaCommand):
    description = "Set limits for a user, a group or the default (0: unlimited, none: nothing at this level)."
    aliases = options("QuotasSet", "user", "group", "tokens_per_day", "tokens_per_month", "requests_per_minute",
                      "weight")
    tokens_per_day = Unicode("", help="Tokens per UTC day: N, 0 (unlimited) or none.").tag(config=True)
    tokens_per_month = Unicode("", help="Tokens per UTC month: N, 0 (unlimited) or none.").tag(config=True)
    requests_per_minute = Unicode("", help="Requests per minute: N, 0 (unlimited) or none.").tag(config=True)
    weight = Unicode("", help="Fair-share weight (0.01 to 100) or none.").tag(config=True)

    def values(self, current: dict) -> dict:
        from .quotas import FIELDS

        values = {f: current[f] for f in FIELDS}
        for name in FIELDS:
            raw = getattr(self, name).strip().lower()
            if not raw:
                continue
            try:
                values[name] = None if raw == "none" else float(raw) if name == "weight" else int(raw)
            except ValueError:
                raise BadRequest(f"--{name.replace('_', '-')}: give a number or none, not {raw!r}.") from None
        return values


class QuotasClear(QuotaCommand):
    description = "Remove the quota of a user, a group or the default (the next level applies)."
    aliases = options("QuotasClear", "user", "group")

    def values(self, current: dict) -> dict:
        return {}


class QuotasCommand(Group):
    description = "Show, set or clear quotas (tokens per day and month, requests per minute, fair-share weight)."
    subcommands = commands(show=QuotasShow, set=QuotasSet, clear=QuotasClear)


# -- invites -------------------------------------------------------------------------------------------


class InvitesCreate(Command):
    description = """Create an invitation; its link (or, without InferenceService.hub_public_url, its code: the link is
    <hub>/hub/invite/<code>) is printed once."""
    aliases = options("InvitesCreate", "expires_in_days", "note", "groups")
    expires_in_days = Float(7.0, help="Days until the invitation expires.").tag(config=True)
    note = Unicode("", help="A note for admins and the invited person (e.g. whom it is for).").tag(config=True)
    groups = Unicode("", help="Comma-separated Hub groups the new user joins.").tag(config=True)

    async def act(self, db) -> int:
        from .login import store

        fields = store.parse_invite_request({
            "expires_in_days": self.expires_in_days, "note": self.note,
            "groups": [g.strip() for g in self.groups.split(",") if g.strip()],
        })
        audit = {"actor": self.actor, "client_ip": None}
        code, model = await db.run(lambda session: store.create_invite(session, audit=audit, **fields))
        hub_url = self.service.hub_public_url
        url = store.invite_link(hub_url, code) if hub_url else None
        print(json.dumps({**model, "code": code, "url": url}, indent=2) if self.json else url or code)
        return 0


class InvitesList(Command):
    description = "List invitations, newest first (codes are never stored, so never shown)."
    aliases = options("InvitesList", "status")
    status = Enum(["active", "used", "expired", "revoked"], None, allow_none=True, help="Only these.").tag(
        config=True
    )

    async def act(self, db) -> int:
        from .login import store

        rows = await db.run(store.list_invites, self.status)
        self.show(rows, ["id", "prefix", "status", "expires_at", "created_by", "used_by", "groups", "note"])
        return 0


class InvitesRevoke(Command):
    description = "Revoke an unused invitation: invites revoke ID"

    async def act(self, db) -> int:
        from .login import store

        raw = self.argument("invite id")
        if not raw.isdigit():
            raise BadRequest("An invite id is a number.")
        model = await db.run(store.revoke_invite, int(raw), {"actor": self.actor, "client_ip": None})
        print(f"invite {model['id']}: {model['status']}")
        return 0


class InvitesCommand(Group):
    description = "Create, list or revoke invitations (registration by invite)."
    subcommands = commands(create=InvitesCreate, list=InvitesList, revoke=InvitesRevoke)


# -- resources (presets and knowledge collections) -------------------------------------------------------


class ResourcesList(KeyCommand):
    description = "List a user's presets and collections (--user NAME), or everyone's without --user."
    aliases = options("ResourcesList", "user")

    async def act(self, db) -> int:
        presets, knowledge = self.service.make_resources(db)
        if self.user:
            state = await self.owner()
            rows = [{"user": state.name, "kind": "preset", "name": p["name"], "detail": p["model"]}
                    for p in await presets.list(state.id)]
            rows += [{"user": state.name, "kind": "collection", "name": c["name"], "detail": _size(c)}
                     for c in await knowledge.list(state.id)]
        else:
            rows = [{"user": p["user"], "kind": "preset", "name": p["name"], "detail": p["model"]}
                    for p in await presets.list_all()]
            rows += [{"user": c["user"], "kind": "collection", "name": c["name"], "detail": _size(c)}
                     for c in await knowledge.list_all()]
        self.show(rows, ["user", "kind", "name", "detail"])
        return 0


def _size(collection: dict) -> str:
    return f"{collection['documents']} documents, {collection['chunks']} chunks"


class ResourcesDelete(KeyCommand):
    description = ("Delete a user's data: one preset (--preset NAME), one collection (--collection NAME) or all of "
                   "both (--all); audited.")
    aliases = options("ResourcesDelete", "user", "preset", "collection")
    flags = {**Command.flags, "all": ({"ResourcesDelete": {"delete_all": True}}, "Every preset and collection.")}
    preset = Unicode("", help="The preset to delete.").tag(config=True)
    collection = Unicode("", help="The collection to delete.").tag(config=True)
    delete_all = Bool(False, help="Delete every preset and collection of the user.").tag(config=True)

    async def act(self, db) -> int:
        if sum(map(bool, (self.preset, self.collection, self.delete_all))) != 1:
            raise BadRequest("Give one of --preset NAME, --collection NAME or --all.")
        state = await self.owner()
        presets, knowledge = self.service.make_resources(db)
        audit = self.audit(state.name)
        deleted_presets = deleted_collections = 0
        if self.preset or self.delete_all:
            deleted_presets = await presets.delete(state.id, self.preset or None, audit=audit)
        if self.collection or self.delete_all:
            deleted_collections = await knowledge.delete(state.id, self.collection or None, audit=audit)
        print(f"deleted {deleted_presets} preset(s) and {deleted_collections} collection(s) of {state.name}")
        return 0


class ResourcesCommand(Group):
    description = "List or delete a user's presets and knowledge collections."
    subcommands = commands(list=ResourcesList, delete=ResourcesDelete)
